//! Constrained decoding on the shipped bitnet-tiny model (a story model that never writes
//! JSON by itself): through the scheduler, with llguidance's JSON schemas (feature
//! `constrained`) and with a hand-written constraint that checks the sequence's side of the
//! contract on its own (only allowed tokens, end tokens only where allowed, complete → stop).

use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::generate::json::{JsonFormat, JsonGrammars};
use bitnet_inference::generate::{
    ConstraintSource, FinishReason, GenerationConfig, SharedConstraint, TokenConstraint, TokenMask,
};
use bitnet_inference::scheduler::{
    Completion, DynamicBatchProcessor, Event, Request, RequestError, SchedulerConfig,
};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

fn model() -> Arc<LoadedEngineModel> {
    static MODEL: OnceLock<Arc<LoadedEngineModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny");
            Arc::new(LoadedEngineModel::load(&dir).unwrap())
        })
        .clone()
}

fn grammars() -> &'static JsonGrammars {
    static G: OnceLock<JsonGrammars> = OnceLock::new();
    G.get_or_init(|| JsonGrammars::for_model(&model()).unwrap())
}

fn processor() -> DynamicBatchProcessor {
    let config = SchedulerConfig {
        max_running: 4,
        context_size: Some(512),
        step_tokens: 64,
        ..Default::default()
    };
    DynamicBatchProcessor::new(model(), &config).unwrap()
}

/// Runs the requests together to their ends.
fn run_all(requests: Vec<Request>) -> Vec<Result<Completion, RequestError>> {
    let mut p = processor();
    let streams: Vec<_> = requests.into_iter().map(|r| p.submit(r).unwrap()).collect();
    p.run_until_idle();
    streams.into_iter().map(|s| s.collect_all()).collect()
}

fn prompt(text: &str) -> Vec<u32> {
    model().encode_prompt(text).unwrap()
}

/// Nested object, enum, array, required fields, integer ranges; strings bounded so that
/// the tiny model finishes within its tokens.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 1, "maximum": 120},
            "pet": {"enum": ["cat", "dog", "fish"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "home": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "pet", "tags", "home"],
        "additionalProperties": false
    })
}

/// Checks `text` against [`person_schema`] by hand (serde_json parses; the rules are
/// spelled out here, not taken from llguidance).
fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let o = v.as_object().expect("an object");
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "home", "name", "pet", "tags"], "{text}");
    assert!(o["name"].as_str().unwrap().chars().count() <= 12, "{text}");
    let age = o["age"].as_i64().expect("an integer age");
    assert!((1..=120).contains(&age), "{text}");
    assert!(
        ["cat", "dog", "fish"].contains(&o["pet"].as_str().unwrap()),
        "{text}"
    );
    let tags = o["tags"].as_array().unwrap();
    assert!(tags.len() <= 3, "{text}");
    assert!(tags
        .iter()
        .all(|t| t.as_str().is_some_and(|s| s.chars().count() <= 8)));
    let home = o["home"].as_object().unwrap();
    assert_eq!(home.len(), 2, "{text}");
    assert!(home["city"].as_str().unwrap().chars().count() <= 12);
    let zip = home["zip"].as_i64().expect("an integer zip");
    assert!((10000..=99999).contains(&zip), "{text}");
}

fn person() -> SharedConstraint {
    grammars()
        .compile(&JsonFormat::Schema {
            name: "person".into(),
            schema: person_schema(),
        })
        .unwrap()
}

const PROMPT: &str = "Once upon a time, a little girl named Lily";

#[test]
fn greedy_output_follows_the_schema_where_the_model_alone_writes_a_story() {
    let config = GenerationConfig::greedy(200);
    let got = run_all(vec![
        Request::new(prompt(PROMPT), config.clone()),
        Request::new(prompt(PROMPT), config.clone()).with_constraint(person()),
        Request::new(prompt(PROMPT), config.clone())
            .with_constraint(grammars().compile(&JsonFormat::Object).unwrap()),
    ]);
    let free = got[0].as_ref().unwrap();
    assert!(
        serde_json::from_str::<Value>(&free.text).is_err(),
        "{}",
        free.text
    );
    let person = got[1].as_ref().unwrap();
    assert_eq!(
        person.finish_reason,
        Some(FinishReason::Stop),
        "{}",
        person.text
    );
    check_person(&person.text);
    // Any object: the story model opens one and writes its story as the first key, never
    // closing it; what it gives by the length limit is the start of an object. (SmolLM2
    // closes its object: below.)
    let object = got[2].as_ref().unwrap();
    assert_eq!(object.finish_reason, Some(FinishReason::Length));
    assert!(object.text.starts_with("{\""), "{}", object.text);
}

#[test]
fn sampled_choices_each_follow_the_schema_and_leave_the_others_alone() {
    let m = model();
    let c = person();
    let sampled = |seed| {
        GenerationConfig::default()
            .with_max_new_tokens(200)
            .with_temperature(1.0)
            .with_seed(seed)
    };
    let free = Request::new(prompt("The dog"), sampled(7));
    // Alone, then beside four constrained choices sharing one compiled grammar.
    let alone = run_all(vec![free.clone()]).remove(0).unwrap();
    let mut reqs = vec![free];
    for seed in 1..=4 {
        reqs.push(Request::new(prompt(PROMPT), sampled(seed)).with_constraint(c.clone()));
    }
    let got = run_all(reqs);
    assert_eq!(got[0].as_ref().unwrap().tokens, alone.tokens);
    let texts: Vec<String> = got[1..]
        .iter()
        .map(|r| {
            let r = r.as_ref().unwrap();
            assert_eq!(r.finish_reason, Some(FinishReason::Stop), "{}", r.text);
            check_person(&r.text);
            r.text.clone()
        })
        .collect();
    assert!(texts.windows(2).any(|w| w[0] != w[1]), "{texts:?}");
    assert!(m.pieces.len() == 4096);
}

#[test]
fn max_tokens_before_the_end_gives_the_prefix_and_length() {
    let full = run_all(vec![Request::new(
        prompt(PROMPT),
        GenerationConfig::greedy(200),
    )
    .with_constraint(person())])
    .remove(0)
    .unwrap();
    let cut = run_all(vec![Request::new(
        prompt(PROMPT),
        GenerationConfig::greedy(6),
    )
    .with_constraint(person())])
    .remove(0)
    .unwrap();
    assert_eq!(cut.finish_reason, Some(FinishReason::Length));
    assert_eq!(cut.tokens[..], full.tokens[..6]);
    assert!(full.text.starts_with(&cut.text) && cut.text.len() < full.text.len());
    // A stop string cuts the JSON where it occurs, as it would any text.
    let stopped = run_all(vec![Request::new(
        prompt(PROMPT),
        GenerationConfig::greedy(200).with_stop_string("\"age\""),
    )
    .with_constraint(person())])
    .remove(0)
    .unwrap();
    assert_eq!(stopped.finish_reason, Some(FinishReason::Stop));
    assert!(full.text.starts_with(&stopped.text) && full.text.contains("\"age\""));
    assert!(!stopped.text.contains("age"), "{}", stopped.text);
}

#[test]
fn refused_schemas_say_why() {
    let g = grammars();
    let schema = |s: Value| {
        g.compile(&JsonFormat::Schema {
            name: "x".into(),
            schema: s,
        })
        .err()
        .unwrap_or_else(|| panic!("compiled"))
    };
    let e = schema(json!({"type": "fancy"}));
    assert!(e.contains("fancy"), "{e}");
    let e = schema(json!({"type": "integer", "minimum": 5, "maximum": 1}));
    assert!(!e.is_empty());
    let e = schema(json!([1, 2]));
    assert!(e.contains("schema object"), "{e}");
    let mut deep = json!({"type": "integer"});
    for _ in 0..40 {
        deep = json!({"type": "array", "items": deep});
    }
    let e = schema(deep);
    assert!(e.contains("levels"), "{e}");
    let big: Vec<String> = (0..20_000).map(|i| format!("value{i}")).collect();
    let e = schema(json!({"enum": big}));
    assert!(e.contains("bytes"), "{e}");
    // llguidance builds about one lexer state per unit of a multipleOf's coefficient, before
    // its fuel applies: this one took over 2.5 GB and a minute (the `schema` fuzz target).
    let t = Instant::now();
    let e = schema(json!({"allOf": [{"properties": {"b": {"oneOf": [
        {"type": "string"}, {"type": "integer", "maximum": 9, "multipleOf": 16777217}]}}}]}));
    assert!(
        e.contains("/allOf/0/properties/b/oneOf/1/multipleOf") && e.contains("at most 100000"),
        "{e}"
    );
    // Many small ones add up (20 × 100003 took 23 s and 760 MB).
    let props: serde_json::Map<String, Value> = (0..20)
        .map(|i| {
            (
                format!("p{i}"),
                json!({"type": "integer", "multipleOf": 10007}),
            )
        })
        .collect();
    let e = schema(json!({"type": "object", "properties": props}));
    assert!(e.contains("adding up to 100070"), "{e}");
    let e = schema(json!({"type": "number", "multipleOf": -3}));
    assert!(
        e.contains("`/multipleOf` = -3: expected a number above 0"),
        "{e}"
    );
    assert!(t.elapsed().as_secs_f64() < 5.0);
    // Within the sum, as llguidance reads decimals: compiles.
    for ok in [json!(0.25), json!(1e-7), json!(99991)] {
        g.compile(&JsonFormat::Schema {
            name: "x".into(),
            schema: json!({"type": "number", "multipleOf": ok}),
        })
        .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn hostile_schemas_are_refused_or_compile_in_bounded_time() {
    let g = grammars();
    // Within the size and depth limits, but costly for a lexer or parser: many
    // alternatives of long patterns, nested anyOf, a regex that explodes as a DFA.
    let patterns: Vec<Value> = (0..200)
        .map(|i| json!({"type": "string", "pattern": format!("^(a|b)*a(a|b){{{}}}$", 10 + i % 10)}))
        .collect();
    let mut nested = json!({"type": "integer"});
    // Ten levels (three of JSON each: within the depth limit), each an alternative.
    for i in 0..10 {
        nested = json!({"anyOf": [
            {"type": "string", "pattern": format!("^x{{{i}}}(a|b)*a(a|b){{12}}$")},
            {"type": "array", "items": nested},
        ]});
    }
    for (what, s) in [
        ("patterns", json!({"anyOf": patterns})),
        ("nested anyOf", nested),
        (
            "dfa blow-up",
            json!({"type": "string", "pattern": "^(a|b)*a(a|b){40}$"}),
        ),
        (
            "long counted repetition",
            json!({"type": "string", "pattern": "^((a|b)*a(a|b){30}){1000}$"}),
        ),
        (
            "huge lengths",
            json!({"type": "array", "minItems": 100000, "items": {"type": "string", "minLength": 1000000}}),
        ),
        ("many properties", {
            let props: serde_json::Map<String, Value> = (0..900)
                .map(|i| {
                    (
                        format!("p{i}"),
                        json!({"type": "string", "pattern": format!("^[a-z]{{{}}}$", i % 50)}),
                    )
                })
                .collect();
            let required: Vec<String> = (0..900).map(|i| format!("p{i}")).collect();
            json!({"type": "object", "properties": props, "required": required})
        }),
    ] {
        let t = Instant::now();
        let r = g.compile(&JsonFormat::Schema {
            name: what.into(),
            schema: s,
        });
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "{what}: {} in {secs:.2} s",
            r.as_ref().err().map_or("compiled", |e| e.as_str())
        );
        // Generous for a loaded 2-core machine; llguidance's fuel limits stop it far sooner.
        assert!(secs < 20.0, "{what}: {secs} s");
        if let Ok(c) = r {
            // It may compile; then each step is bounded by the step limits.
            let got = run_all(vec![Request::new(
                prompt(PROMPT),
                GenerationConfig::greedy(20),
            )
            .with_constraint(c)]);
            eprintln!(
                "{what}: ran in {:.2} s: {:?}",
                t.elapsed().as_secs_f64(),
                got[0].as_ref().map(|c| (c.finish_reason, c.text.len()))
            );
            assert!(t.elapsed().as_secs_f64() < 40.0, "{what}");
            match &got[0] {
                Ok(_) | Err(RequestError::Constraint(_)) => {}
                Err(e) => panic!("{what}: {e}"),
            }
        }
    }
}

/// Digits only; the output may end after `min` tokens and is complete after `max`.
struct Digits {
    allowed: Arc<Vec<u32>>,
    min: usize,
    max: usize,
    taken: usize,
}

struct DigitsSource {
    allowed: Arc<Vec<u32>>,
    min: usize,
    max: usize,
}

impl ConstraintSource for DigitsSource {
    fn start(&self) -> Result<Box<dyn TokenConstraint>, String> {
        Ok(Box::new(Digits {
            allowed: self.allowed.clone(),
            min: self.min,
            max: self.max,
            taken: 0,
        }))
    }
    fn describe(&self) -> String {
        "digits".into()
    }
}

impl TokenConstraint for Digits {
    fn next_allowed(&mut self, mask: &mut TokenMask) -> Result<bool, String> {
        for &id in self.allowed.iter() {
            mask.allow(id);
        }
        Ok(self.taken >= self.min)
    }
    fn accept(&mut self, token: u32) -> Result<(), String> {
        if !self.allowed.contains(&token) {
            return Err(format!("token {token} is not a digit"));
        }
        self.taken += 1;
        Ok(())
    }
    fn is_complete(&self) -> bool {
        self.taken >= self.max
    }
}

fn digits(min: usize, max: usize) -> (SharedConstraint, Arc<Vec<u32>>) {
    let m = model();
    let allowed: Vec<u32> = (0..m.pieces.len() as u32)
        .filter(|&id| {
            let b = m.pieces.get(id);
            !b.is_empty() && b.iter().all(u8::is_ascii_digit)
        })
        .collect();
    assert!(allowed.len() >= 10, "{}", allowed.len());
    let allowed = Arc::new(allowed);
    (
        SharedConstraint::new(DigitsSource {
            allowed: allowed.clone(),
            min,
            max,
        }),
        allowed,
    )
}

#[test]
fn only_allowed_tokens_come_out_and_end_tokens_only_where_the_constraint_ends() {
    let m = model();
    let (c, allowed) = digits(3, 12);
    let eos = m.end_tokens[0];
    // The end token pushed far up: taken at the first step it is allowed, never before.
    let mut pushed = GenerationConfig::greedy(50);
    pushed.logit_bias = vec![(eos, 50.0)];
    let mut sampled = GenerationConfig::default()
        .with_max_new_tokens(50)
        .with_temperature(1.5)
        .with_seed(3);
    sampled.top_k = 0;
    sampled.top_p = 1.0;
    sampled.min_p = 0.0;
    let got = run_all(vec![
        Request::new(prompt(PROMPT), pushed).with_constraint(c.clone()),
        Request::new(prompt(PROMPT), sampled.clone()).with_constraint(c.clone()),
        Request::new(prompt(PROMPT), GenerationConfig::greedy(50))
            .with_logprobs(5)
            .with_constraint(digits(12, 12).0),
        Request::new(prompt(PROMPT), sampled),
    ]);
    let ended = got[0].as_ref().unwrap();
    assert_eq!(ended.tokens.len(), 3, "{:?}", ended.tokens);
    assert_eq!(ended.finish_reason, Some(FinishReason::Stop));
    for r in &got[1..3] {
        let r = r.as_ref().unwrap();
        assert!(
            r.tokens.iter().all(|t| allowed.contains(t)),
            "{:?}",
            r.tokens
        );
        assert!(r.text.bytes().all(|b| b.is_ascii_digit()), "{}", r.text);
        assert!((3..=12).contains(&r.tokens.len()));
        assert_eq!(r.finish_reason, Some(FinishReason::Stop));
    }
    // Greedy ran to completion (12 digits); its logprobs are over the allowed tokens only.
    let greedy = got[2].as_ref().unwrap();
    assert_eq!(greedy.tokens.len(), 12);
    for lp in &greedy.logprobs {
        assert_eq!(lp.top[0], (lp.token, lp.logprob));
        assert!(lp
            .top
            .iter()
            .all(|(id, _)| allowed.contains(id) || m.end_tokens.contains(id)));
        let mass: f32 = lp.top.iter().map(|(_, l)| l.exp()).sum();
        assert!(mass <= 1.0 + 1e-4, "{mass}");
    }
    // Without the constraint the model writes words.
    let free = got[3].as_ref().unwrap();
    assert!(
        free.text.bytes().any(|b| b.is_ascii_alphabetic()),
        "{}",
        free.text
    );
}

#[test]
fn a_bias_that_bans_every_allowed_token_fails_the_request_with_a_reason() {
    let (c, allowed) = digits(20, 20);
    let mut config = GenerationConfig::greedy(10);
    config.logit_bias = allowed.iter().map(|&id| (id, f32::NEG_INFINITY)).collect();
    let mut p = processor();
    let s = p
        .submit(Request::new(prompt(PROMPT), config).with_constraint(c))
        .unwrap();
    p.run_until_idle();
    let events: Vec<Event> = s.collect();
    match events.last() {
        Some(Event::Error(RequestError::Constraint(m))) => {
            assert!(m.contains("does not allow"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.stats().running, 0);
}

/// A real instruct model with a 49,152-token byte-level BPE vocabulary and chat markers:
/// `json_object` and the schema through its chat template; its control tokens never appear
/// as text inside the JSON.
#[test]
fn smollm2_answers_in_json_through_its_chat_template() {
    let Some(path) = super::common::smollm2_gguf() else {
        return;
    };
    let m = Arc::new(LoadedEngineModel::load(&path).unwrap());
    let g = JsonGrammars::for_model(&m).unwrap();
    let im_end = m.tokenizer.token_id("<|im_end|>").unwrap();
    assert!(m.tokenizer.is_special(im_end) && m.end_tokens.contains(&im_end));
    let ask = |text: &str| {
        m.encode_chat(&[bitnet_inference::chat::ChatMessage::new("user", text)])
            .unwrap()
    };
    let config = SchedulerConfig {
        max_running: 4,
        context_size: Some(1024),
        step_tokens: 64,
        ..Default::default()
    };
    let mut p = DynamicBatchProcessor::new(m.clone(), &config).unwrap();
    let object = g.compile(&JsonFormat::Object).unwrap();
    let person = g
        .compile(&JsonFormat::Schema {
            name: "person".into(),
            schema: person_schema(),
        })
        .unwrap();
    let reqs = [
        Request::new(
            ask("Describe a cat as a JSON object."),
            GenerationConfig::greedy(300),
        )
        .with_constraint(object),
        Request::new(
            ask("Invent a person: name, age, pet, tags and home (city, zip code) as JSON."),
            GenerationConfig::greedy(300),
        )
        .with_constraint(person),
    ];
    let streams: Vec<_> = reqs.into_iter().map(|r| p.submit(r).unwrap()).collect();
    p.run_until_idle();
    let got: Vec<Completion> = streams
        .into_iter()
        .map(|s| s.collect_all().unwrap())
        .collect();
    eprintln!("object: {}\nperson: {}", got[0].text, got[1].text);
    assert_eq!(
        got[0].finish_reason,
        Some(FinishReason::Stop),
        "{}",
        got[0].text
    );
    let v: Value = serde_json::from_str(&got[0].text).unwrap();
    assert!(
        v.as_object().is_some_and(|o| !o.is_empty()),
        "{}",
        got[0].text
    );
    assert_eq!(
        got[1].finish_reason,
        Some(FinishReason::Stop),
        "{}",
        got[1].text
    );
    check_person(&got[1].text);
    for r in &got {
        assert!(r.tokens.iter().all(|&t| !m.tokenizer.is_special(t)));
    }
}

/// Walks the grammar at random (each step a token drawn uniformly among those the mask
/// allows) and decodes the walk with the tokenizer itself: the trie's bytes for every token
/// must be what the tokenizer decodes it to, or the text would not parse. For the three kinds
/// of vocabulary: a tokenizer.json byte-level BPE (bitnet-tiny), a GGUF `gpt2` BPE with chat
/// markers (SmolLM2) and a GGUF SentencePiece with byte fallback (Llama-2: `▁` for spaces,
/// `<0xNN>` byte tokens).
#[test]
fn random_walks_over_allowed_tokens_decode_to_schema_valid_json() {
    use bitnet_inference::formats::gguf::GgufFile;
    use bitnet_inference::generate::Rng;
    use bitnet_inference::generate::TokenPieces;
    use bitnet_inference::tokenizer::Tokenizer;
    let mut tokenizers: Vec<(&str, Tokenizer)> = vec![(
        "bitnet-tiny",
        Tokenizer::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny/tokenizer.json"),
        )
        .unwrap(),
    )];
    if let Some(path) = super::common::smollm2_gguf() {
        let f = GgufFile::open(&path).unwrap();
        tokenizers.push(("SmolLM2", Tokenizer::from_gguf(&f.metadata, &path).unwrap()));
    }
    if let Some(path) =
        super::tokenizer_fixtures::npm_tokenizer("llama2", "BITNET_LLAMA2_TOKENIZER")
    {
        let meta = super::tokenizer_fixtures::llama2_spm_metadata(&path);
        let tok = Tokenizer::from_gguf(&meta, Path::new("llama2-vocab.gguf")).unwrap();
        tokenizers.push(("Llama-2 SentencePiece", tok));
    }
    for (name, tok) in &tokenizers {
        let pieces = TokenPieces::new(tok, tok.vocab_size());
        let g = JsonGrammars::new(&pieces, |id| tok.is_special(id)).unwrap();
        let c = g
            .compile(&JsonFormat::Schema {
                name: "person".into(),
                schema: person_schema(),
            })
            .unwrap();
        let mut mask = TokenMask::default();
        let mut allowed = Vec::new();
        let mut byte_tokens = 0;
        for seed in 0..8 {
            let mut rng = Rng::new(seed);
            let mut walk = c.start().unwrap();
            let mut ids = Vec::new();
            while !walk.is_complete() {
                assert!(ids.len() < 2000, "{name}: no end in sight");
                mask.clear(pieces.len());
                walk.next_allowed(&mut mask).unwrap();
                allowed.clear();
                allowed.extend((0..pieces.len() as u32).filter(|&id| mask.is_allowed(id)));
                assert!(!allowed.is_empty(), "{name}: nothing allowed after {ids:?}");
                assert!(allowed.iter().all(|&id| !tok.is_special(id)), "{name}");
                let id = allowed[(rng.next_u64() % allowed.len() as u64) as usize];
                walk.accept(id).unwrap();
                byte_tokens += usize::from(pieces.get(id).len() == 1 && pieces.get(id)[0] >= 0x80);
                ids.push(id);
            }
            let text = tok.decode(&ids).unwrap();
            check_person(&text);
        }
        eprintln!("{name}: 8 walks valid ({byte_tokens} single high-byte tokens drawn)");
    }
}
