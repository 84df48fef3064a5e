//! Tasks, following lm-evaluation-harness. Multiple choice: each choice is one log-likelihood
//! request (context, " " + choice); `acc` picks the highest log-likelihood, `acc_norm` the
//! highest log-likelihood per character of the choice (lm-eval's length normalization, which
//! counts characters: bytes for these English sets). LAMBADA: `acc` is greedy decoding
//! reproducing the last word, `perplexity` exp(−mean log-likelihood of it). Standard errors
//! are the sample standard deviation of the per-item scores over √n.

use crate::eval::harness::{LogLikelihood, Request};
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A task by name, or a custom multiple-choice file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    Hellaswag,
    Piqa,
    Winogrande,
    ArcEasy,
    ArcChallenge,
    /// LAMBADA (OpenAI's detokenized test set): the last word of a passage.
    Lambada,
    /// MMLU test set, `shots` examples from the subject's dev set first (lm-eval's format).
    Mmlu {
        shots: usize,
    },
    /// WikiText-2 test articles: word and byte perplexity over rolling windows.
    Wikitext,
    /// jsonl lines {"query": str, "choices": [str], "gold": int}.
    Custom(PathBuf),
    /// A plain-text file: its word and byte perplexity, like wikitext.
    Text(PathBuf),
}

impl Task {
    pub const BUILT_IN: [Task; 9] = [
        Task::Hellaswag,
        Task::Piqa,
        Task::Winogrande,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::Lambada,
        Task::Mmlu { shots: 5 },
        Task::Mmlu { shots: 0 },
        Task::Wikitext,
    ];

    pub fn name(&self) -> String {
        match self {
            Task::Hellaswag => "hellaswag".into(),
            Task::Piqa => "piqa".into(),
            Task::Winogrande => "winogrande".into(),
            Task::ArcEasy => "arc_easy".into(),
            Task::ArcChallenge => "arc_challenge".into(),
            Task::Lambada => "lambada_openai".into(),
            Task::Mmlu { shots: 5 } => "mmlu".into(),
            Task::Mmlu { shots } => format!("mmlu_{shots}shot"),
            Task::Wikitext => "wikitext".into(),
            Task::Custom(p) | Task::Text(p) => p.display().to_string(),
        }
    }

    /// A built-in name, `all`'s members, or a path to a custom `.jsonl` task.
    pub fn parse(s: &str) -> Result<Vec<Task>> {
        if s == "all" {
            return Ok(Self::BUILT_IN.to_vec());
        }
        if let Some(t) = Self::BUILT_IN.iter().find(|t| t.name() == s) {
            return Ok(vec![t.clone()]);
        }
        if s.ends_with(".jsonl") {
            return Ok(vec![Task::Custom(PathBuf::from(s))]);
        }
        if s.ends_with(".txt") {
            return Ok(vec![Task::Text(PathBuf::from(s))]);
        }
        let known: Vec<String> = Self::BUILT_IN.iter().map(Task::name).collect();
        bail!(
            "unknown task {s:?}; known tasks: {}, all, a .jsonl file of {{\"query\", \"choices\", \"gold\"}} lines, or a .txt file (perplexity)",
            known.join(", ")
        )
    }

    /// Whether `acc_norm` is reported (lm-eval reports only `acc` for winogrande, whose
    /// choices share one continuation, and for MMLU, whose choices are single letters).
    pub fn has_acc_norm(&self) -> bool {
        !matches!(self, Task::Winogrande | Task::Mmlu { .. })
    }

    /// The task's items, read from `data_dir` (the shared data's `eval/` folder's parent).
    pub fn load(&self, data_dir: &Path) -> Result<Items> {
        let eval = data_dir.join("eval");
        let choice = Items::Choice;
        Ok(match self {
            Task::Hellaswag => choice(hellaswag(&eval.join("hellaswag/hellaswag_val.jsonl.gz"))?),
            Task::Piqa => choice(piqa(
                &eval.join("piqa/valid.jsonl"),
                &eval.join("piqa/valid-labels.lst"),
            )?),
            Task::Winogrande => choice(winogrande(&eval.join("winogrande/winogrande.jsonl"))?),
            Task::ArcEasy => choice(arc(&eval.join("arc_easy/ARC-Easy-Test.jsonl"))?),
            Task::ArcChallenge => {
                choice(arc(&eval.join("arc_challenge/ARC-Challenge-Test.jsonl"))?)
            }
            Task::Mmlu { shots } => choice(mmlu(&eval.join("mmlu/data"), *shots)?),
            Task::Custom(p) => choice(custom(p)?),
            Task::Lambada => {
                Items::Greedy(lambada(&eval.join("lambada_openai/lambada_openai.jsonl"))?)
            }
            Task::Wikitext => {
                Items::Rolling(wikitext(&eval.join("wikitext2_raw_test/wiki.test.lf.raw"))?)
            }
            Task::Text(p) => {
                let text = read_to_string(p)?;
                if text.trim().is_empty() {
                    bail!("{}: empty text", p.display());
                }
                Items::Rolling(vec![RollingDoc::new(text.clone(), &text)])
            }
        })
    }
}

/// What a task asks of the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Items {
    Choice(Vec<McItem>),
    /// One request each, scored by greedy match and log-likelihood.
    Greedy(Vec<Request>),
    /// Whole documents, scored token by token in rolling windows.
    Rolling(Vec<RollingDoc>),
}

/// A document for word and byte perplexity.
#[derive(Debug, Clone, PartialEq)]
pub struct RollingDoc {
    /// What the model reads.
    pub text: String,
    /// Words and UTF-8 bytes of the original document, the denominators (lm-eval counts
    /// `re.split(r"\s+", page)` pieces).
    pub words: usize,
    pub bytes: usize,
}

impl RollingDoc {
    fn new(text: String, original: &str) -> Self {
        RollingDoc {
            text,
            words: original
                .split(char::is_whitespace)
                .filter(|w| !w.is_empty())
                .count()
                + usize::from(original.starts_with(char::is_whitespace))
                + usize::from(original.ends_with(char::is_whitespace)),
            bytes: original.len(),
        }
    }
}

/// WikiText-2 raw test, split into articles at their " = Title = " lines (this copy has no
/// blank lines, so the split differs slightly from lm-eval's document-level set), each
/// detokenized as lm-eval's `wikitext_detokenizer` does.
fn wikitext(path: &Path) -> Result<Vec<RollingDoc>> {
    let text = read_to_string(path)?;
    let mut pages: Vec<String> = Vec::new();
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        let title = t.starts_with("= ") && t.ends_with(" =") && !t.starts_with("= =");
        match pages.last_mut() {
            Some(page) if !title => page.push_str(line),
            _ => pages.push(line.to_string()),
        }
    }
    if pages.is_empty() {
        bail!("{}: no articles", path.display());
    }
    Ok(pages
        .iter()
        .map(|p| RollingDoc::new(wikitext_detokenize(p), p))
        .collect())
}

/// lm-eval's `wikitext_detokenizer`, step for step.
pub fn wikitext_detokenize(page: &str) -> String {
    use regex::Regex;
    use std::sync::LazyLock;
    static RULES: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
        [
            (r"/' [0-9]/", "/'[0-9]/"),
            (r"\(\s*([^\)]*?)\s*\)", "($1)"),
            (r"\[\s*([^\]]*?)\s*\]", "[$1]"),
            (r"\{\s*([^}]*?)\s*\}", "{$1}"),
            (r#""\s*([^"]*?)\s*""#, "\"$1\""),
            (r"'\s*([^']*?)\s*'", "'$1'"),
        ]
        .into_iter()
        .map(|(re, to)| (Regex::new(re).expect("valid regex"), to))
        .collect()
    });
    let re = |s: String, i: usize| RULES[i].0.replace_all(&s, RULES[i].1).into_owned();
    let mut s = page.replace("s '", "s'");
    s = re(s, 0);
    for (from, to) in [
        (" @-@ ", "-"),
        (" @,@ ", ","),
        (" @.@ ", "."),
        (" : ", ": "),
        (" ; ", "; "),
        (" . ", ". "),
        (" ! ", "! "),
        (" ? ", "? "),
        (" , ", ", "),
    ] {
        s = s.replace(from, to);
    }
    for i in 1..6 {
        s = re(s, i);
    }
    for (from, to) in [
        ("= = = =", "===="),
        ("= = =", "==="),
        ("= =", "=="),
        (" \u{b0} ", "\u{b0}"),
        (" \n", "\n"),
        ("\n ", "\n"),
        (" N ", " 1 "),
        (" 's", "'s"),
    ] {
        s = s.replace(from, to);
    }
    s
}

/// One question: a request per choice and the index of the right one.
#[derive(Debug, Clone, PartialEq)]
pub struct McItem {
    pub requests: Vec<Request>,
    /// Characters of each choice, for `acc_norm`.
    pub choice_chars: Vec<usize>,
    pub gold: usize,
    /// Subgroup (MMLU's subject), for macro averages.
    pub group: Option<String>,
}

impl McItem {
    /// The usual shape: one context, each choice after lm-eval's target delimiter " ".
    fn choices(context: String, choices: &[String], gold: usize) -> Result<Self> {
        if gold >= choices.len() {
            bail!("gold {gold} but {} choices", choices.len());
        }
        Ok(McItem {
            requests: choices
                .iter()
                .map(|c| Request {
                    context: context.clone(),
                    continuation: format!(" {c}"),
                })
                .collect(),
            choice_chars: choices.iter().map(|c| c.chars().count()).collect(),
            gold,
            group: None,
        })
    }
}

/// The choices picked by log-likelihood and by log-likelihood per character (`acc` and
/// `acc_norm`); ties go to the first.
pub fn predict(item: &McItem, answers: &[LogLikelihood]) -> (usize, usize) {
    let argmax = |f: &dyn Fn(usize) -> f64| {
        (0..answers.len())
            .max_by(|&a, &b| f(a).total_cmp(&f(b)).then(b.cmp(&a)))
            .unwrap_or(0)
    };
    (
        argmax(&|i| answers[i].logprob),
        argmax(&|i| answers[i].logprob / item.choice_chars[i].max(1) as f64),
    )
}

/// Per-item correctness: (acc, acc_norm).
pub fn score_item(item: &McItem, answers: &[LogLikelihood]) -> (bool, bool) {
    let (acc, norm) = predict(item, answers);
    (acc == item.gold, norm == item.gold)
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metric {
    pub value: f64,
    pub stderr: Option<f64>,
}

/// Mean of 0/1 scores with lm-eval's standard error (sample std / √n).
pub fn mean_with_stderr(scores: &[bool]) -> Metric {
    let n = scores.len() as f64;
    let mean = scores.iter().filter(|&&s| s).count() as f64 / n.max(1.0);
    let var = if n > 1.0 {
        scores
            .iter()
            .map(|&s| (s as u8 as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0)
    } else {
        0.0
    };
    Metric {
        value: mean,
        stderr: Some((var / n.max(1.0)).sqrt()),
    }
}

fn read_to_string(path: &Path) -> Result<String> {
    if !path.exists() {
        bail!(
            "cannot read {} (is --data-dir the shared data folder?)",
            path.display()
        );
    }
    crate::train::data::read_text(path)
}

/// Parses every non-blank line of a jsonl file, naming file:line on errors.
fn jsonl<T: serde::de::DeserializeOwned, I>(
    path: &Path,
    mut item: impl FnMut(T, usize) -> Result<I>,
) -> Result<Vec<I>> {
    let text = read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let row: T = serde_json::from_str(line).map_err(|e| anyhow!("{}: {e}", at()))?;
        out.push(item(row, i).map_err(|e| anyhow!("{}: {e:#}", at()))?);
    }
    if out.is_empty() {
        bail!("{}: no items", path.display());
    }
    Ok(out)
}

/// HellaSwag validation: the query (activity label and context, preprocessed as lm-eval does,
/// except that the data's ctx_b is not capitalized) and four preprocessed endings.
fn hellaswag(path: &Path) -> Result<Vec<McItem>> {
    #[derive(Deserialize)]
    struct Row {
        query: String,
        endings: Vec<String>,
        label: usize,
    }
    jsonl(path, |r: Row, _| {
        McItem::choices(r.query, &r.endings, r.label)
    })
}

/// PIQA dev: "Question: {goal}\nAnswer:" → " {sol1}" / " {sol2}"; labels in a separate file.
fn piqa(items: &Path, labels: &Path) -> Result<Vec<McItem>> {
    #[derive(Deserialize)]
    struct Row {
        goal: String,
        sol1: String,
        sol2: String,
    }
    let labels_text = read_to_string(labels)?;
    let labels: Vec<&str> = labels_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let out = jsonl(items, |r: Row, i| {
        let label = labels
            .get(i)
            .ok_or_else(|| anyhow!("no label on line {} of valid-labels.lst", i + 1))?;
        let gold = label.trim().parse().map_err(|_| {
            anyhow!(
                "valid-labels.lst:{}: expected 0 or 1, found {label:?}",
                i + 1
            )
        })?;
        McItem::choices(
            format!("Question: {}\nAnswer:", r.goal),
            &[r.sol1, r.sol2],
            gold,
        )
    })?;
    if out.len() != labels.len() {
        bail!(
            "{} has {} items but valid-labels.lst has {} labels",
            items.display(),
            out.len(),
            labels.len()
        );
    }
    Ok(out)
}

/// WinoGrande dev, partial scoring: the shared continuation after each filled-in context.
fn winogrande(path: &Path) -> Result<Vec<McItem>> {
    #[derive(Deserialize)]
    struct Row {
        context_options: Vec<String>,
        continuation: String,
        gold: usize,
    }
    jsonl(path, |r: Row, _| {
        if r.gold >= r.context_options.len() {
            bail!("gold {} but {} options", r.gold, r.context_options.len());
        }
        Ok(McItem {
            requests: r
                .context_options
                .iter()
                .map(|c| Request {
                    context: c.clone(),
                    continuation: format!(" {}", r.continuation),
                })
                .collect(),
            choice_chars: r
                .context_options
                .iter()
                .map(|c| c.chars().count())
                .collect(),
            gold: r.gold,
            group: None,
        })
    })
}

/// ARC (AI2 format): "Question: {stem}\nAnswer:" → " {choice}"; the answer key is a label
/// (A-E or 1-5) among the choices'.
fn arc(path: &Path) -> Result<Vec<McItem>> {
    #[derive(Deserialize)]
    struct Choice {
        text: String,
        label: String,
    }
    #[derive(Deserialize)]
    struct Question {
        stem: String,
        choices: Vec<Choice>,
    }
    #[derive(Deserialize)]
    struct Row {
        question: Question,
        #[serde(rename = "answerKey")]
        answer_key: String,
    }
    jsonl(path, |r: Row, _| {
        let gold = r
            .question
            .choices
            .iter()
            .position(|c| c.label == r.answer_key)
            .ok_or_else(|| anyhow!("answer key {:?} is not a choice label", r.answer_key))?;
        let texts: Vec<String> = r.question.choices.into_iter().map(|c| c.text).collect();
        McItem::choices(
            format!("Question: {}\nAnswer:", r.question.stem),
            &texts,
            gold,
        )
    })
}

/// LAMBADA: the passage, then " " + its last word.
fn lambada(path: &Path) -> Result<Vec<Request>> {
    #[derive(Deserialize)]
    struct Row {
        context: String,
        continuation: String,
    }
    jsonl(path, |r: Row, _| {
        Ok(Request {
            context: r.context,
            continuation: format!(" {}", r.continuation),
        })
    })
}

/// MMLU: per subject (sorted), each test question after lm-eval's header and the first
/// `shots` dev examples; choices " A" … " D".
fn mmlu(dir: &Path, shots: usize) -> Result<Vec<McItem>> {
    let read = |path: &Path| -> Result<Vec<[String; 6]>> {
        let mut rows = Vec::new();
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_path(path)
            .with_context(|| {
                format!(
                    "cannot read {} (is --data-dir the shared data folder?)",
                    path.display()
                )
            })?;
        for (i, rec) in reader.records().enumerate() {
            let rec = rec.map_err(|e| anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            let fields: Vec<String> = rec.iter().map(str::to_string).collect();
            let row: [String; 6] = fields.try_into().map_err(|f: Vec<String>| {
                anyhow!(
                    "{}:{}: expected 6 fields (question, A, B, C, D, answer), found {}",
                    path.display(),
                    i + 1,
                    f.len()
                )
            })?;
            if !["A", "B", "C", "D"].contains(&row[5].trim()) {
                bail!(
                    "{}:{}: answer {:?} is not A, B, C or D",
                    path.display(),
                    i + 1,
                    row[5]
                );
            }
            rows.push(row);
        }
        Ok(rows)
    };
    let format = |r: &[String; 6]| {
        format!(
            "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
            r[0].trim(),
            r[1],
            r[2],
            r[3],
            r[4]
        )
    };
    let test_dir = dir.join("test");
    let mut subjects: Vec<String> = std::fs::read_dir(&test_dir)
        .with_context(|| {
            format!(
                "cannot read {} (is --data-dir the shared data folder?)",
                test_dir.display()
            )
        })?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix("_test.csv")
                .map(str::to_string)
        })
        .collect();
    subjects.sort();
    if subjects.is_empty() {
        bail!("{}: no *_test.csv files", test_dir.display());
    }
    let letters = ["A", "B", "C", "D"].map(String::from);
    let mut items = Vec::new();
    for subject in subjects {
        let dev = read(&dir.join("dev").join(format!("{subject}_dev.csv")))?;
        if dev.len() < shots {
            bail!(
                "{subject}: {shots} shots asked, the dev set has {}",
                dev.len()
            );
        }
        let mut header = format!(
            "The following are multiple choice questions (with answers) about {}.\n\n",
            subject.replace('_', " ")
        );
        for r in &dev[..shots] {
            header.push_str(&format!("{} {}\n\n", format(r), r[5].trim()));
        }
        for r in read(&test_dir.join(format!("{subject}_test.csv")))? {
            let gold = letters
                .iter()
                .position(|l| l == r[5].trim())
                .expect("checked above");
            let mut item = McItem::choices(format!("{header}{}", format(&r)), &letters, gold)?;
            item.group = Some(subject.clone());
            items.push(item);
        }
    }
    Ok(items)
}

/// A user's multiple-choice file: {"query": str, "choices": [str, ...], "gold": int} per line.
fn custom(path: &Path) -> Result<Vec<McItem>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Row {
        query: String,
        choices: Vec<String>,
        gold: usize,
    }
    jsonl(path, |r: Row, _| {
        if r.choices.len() < 2 {
            bail!("expected at least 2 choices, found {}", r.choices.len());
        }
        McItem::choices(r.query, &r.choices, r.gold)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ll(logprob: f64) -> LogLikelihood {
        LogLikelihood {
            logprob,
            greedy: false,
            tokens: 1,
        }
    }

    #[test]
    fn acc_and_length_normalized_acc_by_hand() {
        let item = McItem::choices("Q".into(), &["a".into(), "bbbbbbbbbb".into()], 1).unwrap();
        assert_eq!(item.requests[1].continuation, " bbbbbbbbbb");
        // Raw: choice 0 wins (−2 > −5). Per character: −2/1 = −2 < −5/10 = −0.5, choice 1.
        assert_eq!(score_item(&item, &[ll(-2.0), ll(-5.0)]), (false, true));
        assert_eq!(score_item(&item, &[ll(-9.0), ll(-5.0)]), (true, true));
    }

    #[test]
    fn stderr_is_sample_std_over_sqrt_n() {
        // Scores 1, 1, 0, 0: mean 0.5, sample variance 1/3, stderr √(1/3 / 4) = 0.288675.
        let m = mean_with_stderr(&[true, true, false, false]);
        assert_eq!(m.value, 0.5);
        assert!((m.stderr.unwrap() - 0.288_675_134_6).abs() < 1e-9);
    }

    #[test]
    fn arc_labels_can_be_digits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("arc.jsonl");
        std::fs::write(&p, r#"{"id":"x","question":{"stem":"Two?","choices":[{"text":"one","label":"1"},{"text":"two","label":"2"}]},"answerKey":"2"}"#).unwrap();
        let items = arc(&p).unwrap();
        assert_eq!(items[0].gold, 1);
        assert_eq!(items[0].requests[0].context, "Question: Two?\nAnswer:");
    }

    #[test]
    fn malformed_custom_file_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mine.jsonl");
        std::fs::write(
            &p,
            "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\n\n{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 0}\n",
        )
        .unwrap();
        let err = format!("{:#}", custom(&p).unwrap_err());
        assert!(
            err.contains("mine.jsonl:3") && err.contains("at least 2 choices"),
            "{err}"
        );
        std::fs::write(
            &p,
            "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 5}\n",
        )
        .unwrap();
        let err = format!("{:#}", custom(&p).unwrap_err());
        assert!(
            err.contains("mine.jsonl:1") && err.contains("gold 5"),
            "{err}"
        );
        std::fs::write(&p, "not json\n").unwrap();
        let err = format!("{:#}", custom(&p).unwrap_err());
        assert!(err.contains("mine.jsonl:1"), "{err}");
    }

    /// lm-eval's MMLU prompt: header, `shots` dev examples with their answers, the question.
    #[test]
    fn mmlu_prompt_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["dev", "test"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::fs::write(
            dir.path().join("dev/high_school_x_dev.csv"),
            "1+1?,1,2,3,4,B\n\"Say \"\"hi\"\", twice\",hi,hi hi,no,yes,B\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("test/high_school_x_test.csv"),
            " 2+2? ,4,3,2,1,A\n",
        )
        .unwrap();
        let items = mmlu(dir.path(), 2).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(
            items[0].requests[0].context,
            "The following are multiple choice questions (with answers) about high school x.\n\n\
             1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n\
             Say \"hi\", twice\nA. hi\nB. hi hi\nC. no\nD. yes\nAnswer: B\n\n\
             2+2?\nA. 4\nB. 3\nC. 2\nD. 1\nAnswer:"
        );
        assert_eq!(items[0].requests[3].continuation, " D");
        assert_eq!(
            (items[0].gold, items[0].group.as_deref()),
            (0, Some("high_school_x"))
        );
        let zero = mmlu(dir.path(), 0).unwrap();
        assert!(zero[0].requests[0]
            .context
            .ends_with("high school x.\n\n2+2?\nA. 4\nB. 3\nC. 2\nD. 1\nAnswer:"));
        assert!(format!("{:#}", mmlu(dir.path(), 3).unwrap_err()).contains("3 shots"));
        std::fs::write(
            dir.path().join("test/high_school_x_test.csv"),
            "q,1,2,3,4,E\n",
        )
        .unwrap();
        let err = format!("{:#}", mmlu(dir.path(), 0).unwrap_err());
        assert!(
            err.contains("high_school_x_test.csv:1") && err.contains("not A, B, C or D"),
            "{err}"
        );
    }

    #[test]
    fn wikitext_detokenizer_by_hand() {
        assert_eq!(
            wikitext_detokenize(" = Title = \n He said \" hi there \" ( twice ) , 1 @,@ 000 @-@ odd . The boys ' toys 's \n"),
            // What lm-eval's Python gives for the same page.
            " = Title =\nHe said \"hi there\" (twice), 1,000-odd. The boys'toys's\n"
        );
    }

    #[test]
    fn words_and_bytes_count_like_lm_eval() {
        // re.split(r"\s+", " a b\n") == ['', 'a', 'b', '']: 4 pieces.
        let d = RollingDoc::new(String::new(), " a b\n");
        assert_eq!((d.words, d.bytes), (4, 5));
        assert_eq!(RollingDoc::new(String::new(), "a  b").words, 2);
    }

    #[test]
    fn unknown_task_lists_the_known_ones() {
        let err = Task::parse("hellaswagg").unwrap_err().to_string();
        assert!(
            err.contains("hellaswag, piqa, winogrande, arc_easy, arc_challenge"),
            "{err}"
        );
    }
}
