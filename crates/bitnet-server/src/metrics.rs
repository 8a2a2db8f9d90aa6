//! `/metrics`: the scheduler's counters and the server's latency histograms in Prometheus'
//! text format (the `prometheus-client` crate's encoder).

use bitnet_inference::scheduler::SchedulerStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};

/// Reads the scheduler's counters at each scrape.
pub type StatsSource = Arc<OnceLock<Box<dyn Fn() -> SchedulerStats + Send + Sync>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub status: u16,
}

/// What the server measures itself, and the registry that encodes it with the scheduler's.
pub struct Metrics {
    registry: Registry,
    /// From a request's arrival to its first generated token.
    pub ttft: Histogram,
    /// Between two tokens of one choice.
    pub itl: Histogram,
    /// From arrival to the last event.
    pub request_duration: Histogram,
    pub http: Family<HttpLabels, Counter>,
}

struct EngineCollector {
    stats: StatsSource,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCollector")
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for EngineCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Nothing until the model is loaded.
        let Some(read) = self.stats.get() else {
            return Ok(());
        };
        let s = read();
        let e = &mut enc;
        gauge(
            e,
            "requests_running",
            "Requests in the running batch",
            s.running as f64,
        )?;
        gauge(
            e,
            "requests_queued",
            "Requests waiting for a slot",
            s.queued as f64,
        )?;
        counter(
            e,
            "requests_admitted",
            "Requests admitted into the batch",
            s.admitted,
        )?;
        counter(
            e,
            "requests_finished",
            "Requests that ended by a stop or length",
            s.finished,
        )?;
        counter(
            e,
            "requests_cancelled",
            "Requests cancelled (client gone, shutdown)",
            s.cancelled,
        )?;
        counter(
            e,
            "prompt_tokens",
            "Prompt tokens of admitted requests",
            s.prompt_tokens,
        )?;
        counter(
            e,
            "prompt_cached_tokens",
            "Prompt tokens served from the prefix cache instead of prefilled",
            s.cached_prompt_tokens,
        )?;
        counter(
            e,
            "prefix_cache_hits",
            "Admissions that reused a cached prefix",
            s.prefix_hits,
        )?;
        counter(
            e,
            "generation_tokens",
            "Generated tokens",
            s.generated_tokens,
        )?;
        counter(e, "steps", "Forward steps run", s.steps)?;
        counter(
            e,
            "batch_tokens",
            "Tokens in all forward steps (batch_tokens / steps: the mean batch size)",
            s.batch_tokens,
        )?;
        gauge(
            e,
            "kv_cache_bytes",
            "Bytes of KV cache planned",
            s.kv_cache_bytes as f64,
        )?;
        gauge(
            e,
            "kv_cache_slots",
            "KV slots (running requests and cached prefixes)",
            s.kv_slots as f64,
        )?;
        gauge(
            e,
            "kv_cache_cached_slots",
            "Free KV slots holding a cached prefix",
            s.kv_cached_slots as f64,
        )?;
        let capacity = (s.kv_slots * s.kv_slot_tokens).max(1);
        gauge(
            e,
            "kv_cache_used_bytes",
            "Bytes of KV cache the running requests hold now",
            (s.kv_used_tokens * (s.kv_cache_bytes / capacity)) as f64,
        )?;
        gauge(
            e,
            "requests_max_running",
            "Requests that may run at once (each with the whole context)",
            s.max_running as f64,
        )?;
        gauge(
            e,
            "kv_cache_usage_ratio",
            "Share of the KV cache's token positions the running requests hold",
            s.kv_used_tokens as f64 / capacity as f64,
        )?;
        if s.device_weights_bytes > 0 {
            gauge(
                e,
                "gpu_weights_bytes",
                "Bytes of GPU memory the weights take",
                s.device_weights_bytes as f64,
            )?;
            gauge(
                e,
                "gpu_memory_used_bytes",
                "Bytes of GPU memory the engine holds: weights, KV cache, buffers",
                (s.device_weights_bytes + s.kv_cache_bytes + s.scratch_bytes) as f64,
            )?;
            if s.device_total_bytes > 0 {
                gauge(
                    e,
                    "gpu_memory_total_bytes",
                    "Bytes of memory of the GPU",
                    s.device_total_bytes as f64,
                )?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new(stats: StatsSource) -> Self {
        let mut registry = Registry::with_prefix("bitnet");
        let ttft = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let itl = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let request_duration = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        let http = Family::<HttpLabels, Counter>::default();
        registry.register(
            "time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            ttft.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Between two generated tokens of one choice",
            itl.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From a generation request's arrival to its end",
            request_duration.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http.clone(),
        );
        registry.register_collector(Box::new(EngineCollector { stats }));
        Metrics {
            registry,
            ttft,
            itl,
            request_duration,
            http,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
