//! The evaluation harness on tiny models: the log-likelihood engine and task scoring.

mod common;

use supra::convert::{convert, ConvertOptions};
use supra::eval::harness::{encode_pair, Engine, Request, MIN_SHARED_PREFIX};
use supra::io::LoadedModel;
use supra::model::llama::Llama;
use supra::testing::write_tiny_gguf;

fn tiny_teacher(dir: &std::path::Path) -> LoadedModel {
    let p = dir.join("teacher.gguf");
    write_tiny_gguf(&p, 5).unwrap();
    supra::io::load(&p).unwrap()
}

fn requests() -> Vec<Request> {
    let r = |c: &str, x: &str| Request {
        context: c.to_string(),
        continuation: x.to_string(),
    };
    vec![
        r("The cat sat on the", " mat"),
        r("The cat sat on the", " hat and sang"),
        r("The cat sat on the", "m"),
        r("Question: what is 2 + 2?\nAnswer:", " 4"),
        r("Question: what is 2 + 2?\nAnswer:", " four, of course"),
        r("", "Hello there"),
        // A few-shot header longer than the engine's sharing threshold, then two questions.
        r(&format!("{HEADER}Q: one?\nA:"), " yes"),
        r(&format!("{HEADER}Q: one?\nA:"), " no"),
        r(&format!("{HEADER}Q: two?\nA:"), " maybe so"),
        r(&format!("{HEADER}Q: two?\nA:"), " no"),
        r("Unrelated", " text"),
    ]
}

const HEADER: &str = "The following are questions about cats and mats, with answers.\n\n\
                      Q: is the cat on the mat?\nA: yes\n\n";

/// Reading a shared context once and cloning its state gives what scoring each request as one
/// whole sequence gives, for softmax, SUPRA and hybrid models.
#[test]
fn shared_prefix_matches_whole_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path());
    let supra = convert(&teacher, &ConvertOptions::default()).unwrap();
    let hybrid = convert(
        &teacher,
        &ConvertOptions {
            softmax_layers: vec![1],
            ..Default::default()
        },
    )
    .unwrap();
    for (name, m) in [
        ("softmax", &teacher),
        ("supra", &supra),
        ("hybrid", &hybrid),
    ] {
        let model = Llama::new(&m.config, &m.weights).unwrap();
        assert!(m.tokenizer.encode(HEADER).unwrap().len() >= MIN_SHARED_PREFIX);
        let engine = |share_prefix| Engine {
            model: &model,
            tokenizer: &m.tokenizer,
            share_prefix,
            max_length: 64,
        };
        let mut calls = Vec::new();
        let shared = engine(true).run(&requests(), |n| calls.push(n)).unwrap();
        let whole = engine(false).run(&requests(), |_| {}).unwrap();
        assert_eq!(
            calls,
            vec![3, 5, 6, 8, 10, 11],
            "{name}: one progress call per context"
        );
        for (i, (a, b)) in shared.iter().zip(&whole).enumerate() {
            assert!(
                (a.logprob - b.logprob).abs() < 1e-3,
                "{name} request {i}: {} vs {}",
                a.logprob,
                b.logprob
            );
            assert_eq!(
                (a.greedy, a.tokens),
                (b.greedy, b.tokens),
                "{name} request {i}"
            );
            assert!(a.logprob < 0.0);
        }
    }
}

/// lm-evaluation-harness's pair encoding: trailing context whitespace joins the continuation.
#[test]
fn encode_pair_moves_trailing_whitespace() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_teacher(dir.path());
    let t = &m.tokenizer;
    let (ctx, cont) = encode_pair(t, "The cat ", "sat").unwrap();
    assert_eq!(ctx, t.encode("The cat").unwrap());
    assert_eq!(t.decode(&cont).unwrap(), " sat");
    let (ctx, cont) = encode_pair(t, "", "Hi").unwrap();
    assert_eq!(ctx, vec![t.eos_id.unwrap()]);
    assert_eq!(cont, t.encode("Hi").unwrap());
    assert!(encode_pair(t, "abc", "").is_err());
}

/// `supra eval` end to end on a custom task: the table, the JSON report, and the two ways of
/// running requests agreeing on every answer.
#[test]
fn eval_cli_custom_task_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("teacher.gguf");
    write_tiny_gguf(&model, 5).unwrap();
    let task = dir.path().join("mine.jsonl");
    let lines: Vec<String> = (0..6)
        .map(|i| {
            format!(
                r#"{{"query": "Item {i}: the cat sat on the", "choices": ["mat", "hat on a cat", "m"], "gold": {}}}"#,
                i % 3
            )
        })
        .collect();
    std::fs::write(&task, lines.join("\n")).unwrap();
    let run = |extra: &[&str]| -> serde_json::Value {
        let json = dir.path().join("out.json");
        let mut args = vec![
            "--tasks",
            task.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = common::supra_path("eval", &model, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("mine.jsonl | 6 |"));
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
    };
    let shared = run(&[]);
    let whole = run(&["--no-share-prefix"]);
    let r = &shared["results"][0];
    assert_eq!(r["items"], 6);
    let acc = r["metrics"]["acc"]["value"].as_f64().unwrap();
    assert!(
        ((acc * 6.0).round() - acc * 6.0).abs() < 1e-9,
        "acc {acc} is not k/6"
    );
    assert_eq!(r["metrics"], whole["results"][0]["metrics"]);
    assert!(r["metrics"]["acc_norm"]["value"].is_number());
    assert!(shared["config"]["num_hidden_layers"].is_number());
}

#[test]
fn eval_cli_bad_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("teacher.gguf");
    write_tiny_gguf(&model, 5).unwrap();
    let out = common::supra_path("eval", &model, &["--tasks", "hellaswagg"]);
    common::assert_clean_error(&out, &["unknown task", "hellaswag, piqa"]);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\n{oops\n",
    )
    .unwrap();
    let out = common::supra_path("eval", &model, &["--tasks", bad.to_str().unwrap()]);
    common::assert_clean_error(&out, &["bad.jsonl:2"]);
    let out = common::supra_path(
        "eval",
        &model,
        &[
            "--tasks",
            "piqa",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    common::assert_clean_error(&out, &["eval/piqa/", "--data-dir"]);
}

/// Rolling windows: one window over the text is the text scored after an end-of-text token;
/// smaller windows cut the context but still score every token once.
#[test]
fn rolling_windows() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_teacher(dir.path());
    let model = Llama::new(&m.config, &m.weights).unwrap();
    let text = "the cat sat on the mat and the dog sat on the log, and then they both sat";
    let ids = m.tokenizer.encode(text).unwrap();
    let engine = |max_length| Engine {
        model: &model,
        tokenizer: &m.tokenizer,
        share_prefix: true,
        max_length,
    };
    let mut seq = vec![m.tokenizer.eos_id.unwrap()];
    seq.extend(&ids);
    let whole: f64 = model.score_batch(&[seq]).unwrap()[0]
        .iter()
        .map(|&x| x as f64)
        .sum();
    let (one, n) = engine(1000).rolling(text).unwrap();
    assert_eq!(n, ids.len());
    assert!((one - whole).abs() < 1e-3, "{one} vs {whole}");
    let (cut, n) = engine(5).rolling(text).unwrap();
    assert_eq!(n, ids.len());
    assert!(cut.is_finite() && (cut - one).abs() > 1e-6);
}

/// A .txt task: word and byte perplexity from one total log-likelihood.
#[test]
fn eval_cli_text_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("teacher.gguf");
    write_tiny_gguf(&model, 5).unwrap();
    let text = dir.path().join("mine.txt");
    std::fs::write(
        &text,
        "the cat sat on the mat\nand the dog sat on the log\n",
    )
    .unwrap();
    let json = dir.path().join("out.json");
    let out = common::supra_path(
        "eval",
        &model,
        &[
            "--tasks",
            text.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--max-length",
            "8",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let m = &v["results"][0]["metrics"];
    let get = |k: &str| m[k]["value"].as_f64().unwrap();
    // 14 words as lm-eval counts them (re.split(r"\s+"): 13 and the empty piece after the
    // final newline), 50 bytes: log(word ppl) · 14 = −Σ log p = bits/byte · ln 2 · 50.
    let nll_from_words = get("word_perplexity").ln() * 14.0;
    let nll_from_bytes = get("bits_per_byte") * std::f64::consts::LN_2 * 50.0;
    assert!((nll_from_words - nll_from_bytes).abs() < 1e-6 * nll_from_words);
    assert!((get("byte_perplexity").ln() * 50.0 - nll_from_bytes).abs() < 1e-6 * nll_from_bytes);
    assert_eq!(v["max_length"], 8);
}

#[test]
fn compare_cli() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, acc: f64| {
        let p = dir.path().join(name);
        let v = serde_json::json!({"results": [{"task": "piqa", "metrics": {"acc": {"value": acc, "stderr": 0.01}}}]});
        std::fs::write(&p, v.to_string()).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (a, b) = (write("teacher.json", 0.6), write("linear.json", 0.45));
    let out = common::supra(&["compare", &a, &b]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("| task | metric | teacher | linear | Δ | retention |"),
        "{table}"
    );
    assert!(
        table.contains("| piqa | acc | 60.00 | 45.00 | -15.00 | 75.0 % |"),
        "{table}"
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{oops").unwrap();
    let out = common::supra(&["compare", &a, bad.to_str().unwrap()]);
    common::assert_clean_error(&out, &["bad.json", "not JSON"]);
}
