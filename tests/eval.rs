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
