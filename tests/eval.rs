//! The evaluation harness on tiny models: the log-likelihood engine and task scoring.

mod common;

use common::testing::write_tiny_gguf;
use supra::convert::{convert, ConvertOptions};
use supra::eval::harness::{encode_pair, Engine, LogLikelihood, Request, MIN_SHARED_PREFIX};
use supra::io::LoadedModel;
use supra::model::llama::Llama;

/// A tiny random teacher written to DIR/teacher.gguf.
fn tiny_gguf(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("teacher.gguf");
    write_tiny_gguf(&p, 5).unwrap();
    p
}

fn tiny_teacher(dir: &std::path::Path) -> LoadedModel {
    supra::io::load(&tiny_gguf(dir)).unwrap()
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
        // A few-shot header longer than the engine's sharing threshold, then questions whose
        // single-token choices (MMLU's letters) share one row.
        r(&format!("{}Q: one?\nA:", header()), " yes"),
        r(&format!("{}Q: one?\nA:", header()), " no"),
        r(&format!("{}Q: two?\nA:", header()), " maybe so"),
        r(&format!("{}Q: two?\nA:", header()), " no"),
        r(&format!("{}Q: three?\nA:", header()), " A"),
        r(&format!("{}Q: three?\nA:", header()), " B"),
        r("Unrelated", " text"),
    ]
}

fn header() -> String {
    let mut h = String::from("The following are questions about cats and mats, with answers.\n\n");
    for q in [
        "is the cat on the mat?",
        "is the hat on the cat?",
        "did the cat sing?",
    ] {
        h.push_str(&format!("Q: {q}\nA: yes\n\n"));
    }
    h
}

/// Reading a shared context once and copying its state, in padded batches or one request at
/// a time, gives what scoring each request alone as one whole sequence gives, for softmax,
/// SUPRA and hybrid models; a resumed run answers only what it was not given.
#[test]
fn shared_prefix_and_batches_match_whole_sequences() {
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
    let requests = requests();
    for (name, m) in [
        ("softmax", &teacher),
        ("supra", &supra),
        ("hybrid", &hybrid),
    ] {
        let model = Llama::new(&m.config, &m.weights).unwrap();
        assert!(m.tokenizer.encode(&header()).unwrap().len() >= MIN_SHARED_PREFIX);
        let engine = |share_prefix, batch_tokens| Engine {
            model: &model,
            tokenizer: &m.tokenizer,
            share_prefix,
            batch_tokens,
            max_length: 64,
        };
        let whole = engine(false, 1).run(&requests, &[], |_| Ok(())).unwrap();
        for (share, batch) in [(true, 1), (true, 4096), (false, 4096)] {
            let mut calls = 0;
            let answers = engine(share, batch)
                .run(&requests, &[], |a| {
                    calls += a.len();
                    Ok(())
                })
                .unwrap();
            assert_eq!(calls, requests.len(), "{name}: each answer reported once");
            for (i, (a, b)) in answers.iter().zip(&whole).enumerate() {
                let what = format!("{name} share {share} batch {batch} request {i}");
                assert!(
                    (a.logprob - b.logprob).abs() < 1e-3,
                    "{what}: {} vs {}",
                    a.logprob,
                    b.logprob
                );
                assert_eq!((a.greedy, a.tokens), (b.greedy, b.tokens), "{what}");
                assert!(a.logprob < 0.0);
            }
        }
        // Resuming: known answers are kept as given (even a made-up one), the rest computed.
        let mut known: Vec<Option<LogLikelihood>> = vec![None; requests.len()];
        let fake = LogLikelihood {
            logprob: -123.0,
            greedy: true,
            tokens: 1,
        };
        known[0] = Some(fake);
        known[7] = Some(fake);
        let mut asked = Vec::new();
        let answers = engine(true, 4096)
            .run(&requests, &known, |a| {
                asked.extend(a.iter().map(|(i, _)| *i));
                Ok(())
            })
            .unwrap();
        asked.sort();
        let expected: Vec<usize> = (0..requests.len()).filter(|&i| i != 0 && i != 7).collect();
        assert_eq!(asked, expected, "{name}");
        assert_eq!((answers[0], answers[7]), (fake, fake));
        assert!((answers[8].logprob - whole[8].logprob).abs() < 1e-3);
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
    let model = tiny_gguf(dir.path());
    let task = dir.path().join("mine.jsonl");
    let lines: Vec<String> = (0..6)
        .map(|i| {
            let choices = match i % 2 {
                0 => r#"["mat", "hat on a cat", "m"]"#,
                _ => r#"["mat", "hat"]"#,
            };
            format!(
                r#"{{"query": "Item {i}: the cat sat on the", "choices": {choices}, "gold": {}}}"#,
                i % 2
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
    // Guessing: three items of three choices, three of two.
    let chance = r["chance"].as_f64().unwrap();
    assert!(
        (chance - (3.0 / 3.0 + 3.0 / 2.0) / 6.0).abs() < 1e-12,
        "chance {chance}"
    );
    assert!(shared["config"]["num_hidden_layers"].is_number());
}

/// An evaluation stopped part way (here by a bad second task) continues with --resume from
/// the answers journaled beside the report, and gives what an uninterrupted run gives.
#[test]
fn eval_cli_resume() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(dir.path());
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        (0..4)
            .map(|i| format!("{{\"query\": \"Item {i}: the cat\", \"choices\": [\"sat\", \"ran\"], \"gold\": 0}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let second = dir.path().join("second.jsonl");
    std::fs::write(&second, "{oops\n").unwrap();
    let json = dir.path().join("out.json");
    let journal = dir.path().join("out.json.partial.jsonl");
    let tasks = format!("{},{}", good.display(), second.display());
    let run = |extra: &[&str]| {
        let mut args = vec!["--tasks", &tasks, "--json", json.to_str().unwrap()];
        args.extend_from_slice(extra);
        common::supra_path("eval", &model, &args)
    };
    common::assert_clean_error(&run(&[]), &["second.jsonl:1"]);
    let lines = std::fs::read_to_string(&journal).unwrap();
    assert_eq!(
        lines.lines().count(),
        1 + 8,
        "header and the first task's 8 answers"
    );
    common::assert_clean_error(&run(&[]), &["--resume"]);
    std::fs::copy(&good, &second).unwrap();
    let out = run(&["--resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !journal.exists(),
        "the journal goes once the report is written"
    );
    let resumed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let out = run(&[]);
    assert!(out.status.success());
    let fresh: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for t in 0..2 {
        assert_eq!(
            resumed["results"][t]["metrics"],
            fresh["results"][t]["metrics"]
        );
    }
}

#[test]
fn eval_cli_bad_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(dir.path());
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
        batch_tokens: 1,
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
    let model = tiny_gguf(dir.path());
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
        table.contains("| task | metric | teacher | linear | Δ | retention | above chance |"),
        "{table}"
    );
    assert!(
        table.contains("| piqa | acc | 60.00 | 45.00 | -15.00 | 75.0 % | — |"),
        "{table}"
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{oops").unwrap();
    let out = common::supra(&["compare", &a, bad.to_str().unwrap()]);
    common::assert_clean_error(&out, &["bad.json", "not JSON"]);
}

/// Long sequences read in chunks through the state give what one whole forward pass gives, and
/// greedy decoding from the chunked state continues it like whole-sequence argmax does.
#[test]
fn chunked_reading_matches_whole_sequences() {
    use supra::eval::long_context::{greedy, nll_by_position};
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path());
    let supra = convert(&teacher, &ConvertOptions::default()).unwrap();
    let ids = teacher
        .tokenizer
        .encode("the cat sat on the mat and the dog sat on the log and then they both sat down")
        .unwrap();
    for (name, m) in [("softmax", &teacher), ("supra", &supra)] {
        let model = Llama::new(&m.config, &m.weights).unwrap();
        let whole = model
            .score_batch(std::slice::from_ref(&ids))
            .unwrap()
            .remove(0);
        let chunked = nll_by_position(&model, &ids, 7).unwrap();
        assert_eq!(chunked.len(), ids.len() - 1);
        for (i, (a, b)) in chunked.iter().zip(&whole).enumerate() {
            assert!((a + b).abs() < 1e-3, "{name} position {i}: {a} vs {}", -b);
        }
        let out = greedy(&model, &ids[..10], 3).unwrap();
        let mut seq = ids[..10].to_vec();
        for &tok in &out {
            let input = candle_core::Tensor::new(seq.as_slice(), model.device())
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let h = model
                .forward_hidden(&input, None)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let last = h.narrow(0, seq.len() - 1, 1).unwrap();
            let best = model
                .logits(&last)
                .unwrap()
                .argmax(1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()[0];
            assert_eq!(tok, best, "{name}");
            seq.push(tok);
        }
    }
}

/// The probes end to end on a tiny model: tables, JSON and PNG for several models at once;
/// bad arguments are clear errors.
#[test]
fn probe_cli() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(dir.path());
    let books = dir.path().join("books");
    std::fs::create_dir(&books).unwrap();
    let book: String = (0..300)
        .map(|i| format!("The cat number {i} sat on the mat. "))
        .collect();
    std::fs::write(books.join("book.txt"), &book).unwrap();
    std::fs::write(books.join("SOURCE.txt"), "not a book").unwrap();
    let m = model.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = common::supra(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let png = dir.path().join("p.png");
    let json = dir.path().join("p.json");
    let (p, j) = (png.to_str().unwrap(), json.to_str().unwrap());
    for args in [
        vec![
            "probe",
            "passkey",
            m,
            m,
            "--names",
            "a,b",
            "--lengths",
            "400,600",
            "--depths",
            "0,100",
            "--trials",
            "1",
        ],
        vec![
            "probe",
            "needle",
            m,
            "--book",
            books.join("book.txt").to_str().unwrap(),
            "--lengths",
            "500",
            "--depths",
            "50",
        ],
        vec![
            "probe",
            "position",
            m,
            "--text",
            books.to_str().unwrap(),
            "--length",
            "300",
            "--sequences",
            "2",
            "--bucket",
            "100",
        ],
        vec![
            "probe",
            "recall",
            m,
            "--pairs",
            "2,4",
            "--prompts",
            "2",
            "--queries",
            "2",
        ],
    ] {
        let _ = std::fs::remove_file(&png);
        let mut args = args.clone();
        args.extend(["--png", p, "--json", j]);
        let (ok, stdout, stderr) = run(&args);
        assert!(ok, "{args:?}: {stderr}");
        assert!(
            stdout.starts_with("| "),
            "{args:?}: a markdown table: {stdout}"
        );
        assert!(
            std::fs::read(&png).unwrap().starts_with(b"\x89PNG"),
            "{args:?}"
        );
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert!(v["results"].is_array(), "{args:?}");
    }
    let (_, stdout, _) = run(&[
        "probe",
        "passkey",
        m,
        m,
        "--names",
        "a,b",
        "--lengths",
        "400",
        "--depths",
        "0",
        "--trials",
        "1",
        "--png",
        p,
    ]);
    assert!(
        stdout.contains("| a | 400 | 0 |") && stdout.contains("| b | 400 | 0 |"),
        "{stdout}"
    );
    let (_, stdout, _) = run(&[
        "probe",
        "position",
        m,
        "--text",
        books.to_str().unwrap(),
        "--length",
        "300",
        "--sequences",
        "1",
        "--bucket",
        "100",
        "--png",
        p,
    ]);
    assert_eq!(
        stdout.lines().count(),
        2 + 3,
        "three buckets of 100: {stdout}"
    );
    for (args, expect) in [
        (
            vec!["probe", "passkey", m, "--lengths", "10", "--png", p],
            "cannot hold",
        ),
        (
            vec!["probe", "passkey", m, "--depths", "150", "--png", p],
            "0 to 100",
        ),
        (
            vec!["probe", "passkey", m, "--lengths", "4x", "--png", p],
            "4k",
        ),
        (
            vec!["probe", "passkey", m, m, "--names", "a", "--png", p],
            "--names",
        ),
        (
            vec![
                "probe",
                "position",
                m,
                "--text",
                books.to_str().unwrap(),
                "--length",
                "100k",
                "--png",
                p,
            ],
            "fewer than --length",
        ),
        (
            vec!["probe", "recall", m, "--pairs", "500", "--png", p],
            "1 to 128",
        ),
    ] {
        let (ok, _, stderr) = run(&args);
        assert!(!ok && stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Probes reuse what their journal holds and journal what they compute; the CLI refuses to
/// overwrite a journal without --resume and checks it belongs to the run.
#[test]
fn probes_resume_from_their_journal() {
    use supra::eval::journal::Journal;
    use supra::eval::probe::{self, Probe, Subject};
    use supra::eval::tasks::Metric;
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_teacher(dir.path());
    let model = Llama::new(&m.config, &m.weights).unwrap();
    let path = dir.path().join("r.partial.jsonl");
    let mut journal = Journal::open(&path, "h", false).unwrap();
    let fake = Metric {
        value: 0.25,
        stderr: None,
    };
    journal.put("tiny/2/1/1/0", &fake).unwrap();
    let subjects = [Subject {
        name: "tiny".into(),
        model: &model,
        tokenizer: &m.tokenizer,
    }];
    let recall = Probe::Recall {
        pairs: vec![2, 3],
        queries: 1,
        prompts: 1,
        seed: 0,
    };
    let png = dir.path().join("r.png");
    let out = probe::run(&recall, &subjects, &png, Some(&mut journal)).unwrap();
    assert!(
        out.markdown.contains("| tiny | 2 | 25.0 ± 0.0 |"),
        "{}",
        out.markdown
    );
    assert!(journal.get::<Metric>("tiny/3/1/1/0").is_some());

    let gguf = tiny_gguf(dir.path());
    let json = dir.path().join("p.json");
    std::fs::write(Journal::path_for(&json), "another run\n").unwrap();
    let args = |resume: bool| {
        let mut a = vec![
            "probe",
            "recall",
            gguf.to_str().unwrap(),
            "--pairs",
            "2",
            "--prompts",
            "1",
            "--png",
            png.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ];
        if resume {
            a.push("--resume");
        }
        common::supra(&a)
    };
    common::assert_clean_error(&args(false), &["--resume"]);
    common::assert_clean_error(&args(true), &["written for another run"]);
}
