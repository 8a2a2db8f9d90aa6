/* A minimal llama-bench for machines without Python packages: pp = one prompt of N random
 * tokens decoded as one batch, tg = N tokens decoded one at a time, each repeated R times after
 * a warm-up; prints CSV rows `engine,threads,test,avg_ts,stddev_ts` like `bitnet bench -o csv`
 * lets a script pair them up. With DEPTH, each measurement starts after DEPTH random tokens
 * are in the cache (llama-bench's -d; the test is named e.g. `tg64 @ d4000`); the KV cache is
 * llama.cpp's default, f16.
 *
 * Written against the llama.h that the PyPI package llama-cpp-python installs (its bundled
 * llama.cpp); build and run with that package's shared libraries:
 *
 *   SP=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
 *   gcc -O2 -o llama_cpp_bench tools/llama_cpp_bench.c -I$SP/include -L$SP/llama_cpp/lib \
 *       -lllama -lggml -lggml-base -Wl,-rpath,'$ORIGIN'
 *   ./llama_cpp_bench MODEL.gguf THREADS N_PROMPT N_GEN REPS [DEPTH]
 */
#include <llama.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static unsigned long long rng_state = 1;
static int random_token(int vocab) {
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (int)((rng_state >> 33) % (unsigned long long)vocab);
}

static void quiet_log(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

/* Decodes `n` random tokens in batches of at most `batch`; 0 on success. */
static int fill(struct llama_context *ctx, int vocab, int n, int batch) {
    llama_token *toks = malloc(sizeof(llama_token) * (size_t)(n > 0 ? n : 1));
    for (int i = 0; i < n; i++) toks[i] = random_token(vocab);
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i += batch)
        rc = llama_decode(ctx, llama_batch_get_one(&toks[i], n - i < batch ? n - i : batch));
    free(toks);
    return rc;
}

/* One measurement in tokens/s after `depth` cached tokens, or a negative value if
 * llama_decode failed. */
static double run_once(struct llama_context *ctx, int vocab, int n, int batched, int depth,
                       int batch) {
    llama_memory_clear(llama_get_memory(ctx), 1);
    if (fill(ctx, vocab, depth, batch) != 0) return -1.0;
    llama_token *toks = malloc(sizeof(llama_token) * (size_t)n);
    for (int i = 0; i < n; i++) toks[i] = random_token(vocab);
    double t = now();
    if (batched) {
        if (llama_decode(ctx, llama_batch_get_one(toks, n)) != 0) n = -1;
    } else {
        for (int i = 0; i < n && n > 0; i++)
            if (llama_decode(ctx, llama_batch_get_one(&toks[i], 1)) != 0) n = -1;
    }
    double dt = now() - t;
    free(toks);
    return n < 0 ? -1.0 : n / dt;
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: %s MODEL.gguf THREADS N_PROMPT N_GEN REPS [DEPTH]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    int threads = atoi(argv[2]), n_prompt = atoi(argv[3]), n_gen = atoi(argv[4]);
    int reps = atoi(argv[5]), depth = argc == 7 ? atoi(argv[6]) : 0;
    if (threads < 1 || n_prompt < 0 || n_gen < 0 || reps < 1 || depth < 0) {
        fprintf(stderr, "threads and reps must be >= 1, token counts >= 0\n");
        return 2;
    }
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(path, mp);
    if (!model) {
        fprintf(stderr, "%s: llama.cpp could not load the model\n", path);
        return 1;
    }
    int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_context_params cp = llama_context_default_params();
    int longest = n_prompt > n_gen ? n_prompt : n_gen;
    int batch = n_prompt > 0 ? n_prompt : (depth > 0 ? 512 : 1);
    cp.n_ctx = (uint32_t)(depth + longest + 16);
    cp.n_batch = cp.n_ubatch = (uint32_t)batch;
    cp.n_threads = cp.n_threads_batch = threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "%s: llama.cpp could not create a context\n", path);
        return 1;
    }
    for (int batched = 1; batched >= 0; batched--) {
        int n = batched ? n_prompt : n_gen;
        if (n == 0) continue;
        run_once(ctx, vocab, n, batched, depth, batch); /* warm-up */
        double sum = 0, sq = 0;
        for (int r = 0; r < reps; r++) {
            double ts = run_once(ctx, vocab, n, batched, depth, batch);
            if (ts < 0) {
                fprintf(stderr, "%s: llama_decode failed\n", path);
                return 1;
            }
            sum += ts;
            sq += ts * ts;
        }
        double mean = sum / reps;
        double var = reps > 1 ? (sq - reps * mean * mean) / (reps - 1) : 0;
        char test[64];
        int len = snprintf(test, sizeof test, "%s%d", batched ? "pp" : "tg", n);
        if (depth > 0) snprintf(test + len, sizeof test - (size_t)len, " @ d%d", depth);
        printf("llama.cpp,%d,%s,%.3f,%.3f\n", threads, test, mean, var > 0 ? sqrt(var) : 0.0);
        fflush(stdout);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
