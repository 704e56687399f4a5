//! `cargo xtask`: the project's automation, in Rust so that it runs wherever cargo does.
//!
//! - `cargo xtask ci`: fmt check, clippy (twice: as is and with every crate's `cuda` feature),
//!   workspace tests, docs, the GPU-free unit tests of `moe-cuda`'s elastic scaling,
//!   `cargo package --workspace` (every crate builds from its packaged files), the MSRV check
//!   (the declared `rust-version` covers the lockfile) and the loom models of the crates that
//!   have them.
//! - `cargo xtask hil [--run] [FILTER]`: build the GPU bundle into `target/hil/` (test and bench
//!   binaries built with `--features cuda`, plus `run.sh`, and `scale.sh` for the elastic scaling
//!   benchmark of issue 11); with `--run`, also run it here.
//!
//! Architecture invariant: xtask only orchestrates cargo and files; it holds no project logic.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(&args[1..]),
        Some("hil") => hil(&root, &args[1..]),
        Some("msrv") => msrv(&packages()?),
        _ => {
            eprintln!(
                "usage: cargo xtask <ci [--no-loom] | hil [--run] [FILTER] | msrv>\n\
                 \n  ci    fmt, clippy (host and --features cuda), tests, loom models\
                 \n  hil   build the GPU bundle into target/hil (run it with bash target/hil/run.sh)\
                 \n  msrv  check that the declared rust-version covers the lockfile"
            );
            bail!("unknown or missing subcommand");
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The workspace packages as `cargo metadata` reports them.
fn packages() -> Result<Vec<Value>> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Value = serde_json::from_slice(&out.stdout)?;
    Ok(meta["packages"].as_array().cloned().unwrap_or_default())
}

/// Packages that declare a `cuda` feature, as `pkg/cuda` feature specs.
fn cuda_features(pkgs: &[Value]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| p["features"].get("cuda").is_some())
        .map(|p| format!("{}/cuda", p["name"].as_str().unwrap_or_default()))
        .collect()
}

/// Packages with loom models: those that depend on `loom` under `cfg(loom)`.
fn loom_packages(pkgs: &[Value]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| {
            p["dependencies"].as_array().is_some_and(|deps| {
                deps.iter()
                    .any(|d| d["name"] == "loom" && d["target"].as_str() == Some("cfg(loom)"))
            })
        })
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

fn ci(args: &[String]) -> Result<()> {
    let pkgs = packages()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let cuda = cuda_features(&pkgs);
    if !cuda.is_empty() {
        run(cargo()
            .args(["clippy", "--workspace", "--all-targets", "--features"])
            .arg(cuda.join(","))
            .args(["--", "-D", "warnings"]))?;
    }
    run(cargo().args(["test", "--workspace"]))?;
    // The docs build too, with every intra-doc link resolving.
    run(cargo()
        .args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    // Unit tests of CUDA-only host logic (elastic scaling's planning and KV bookkeeping): they
    // need no GPU, only the feature to compile.
    run(cargo().args([
        "test",
        "--package",
        "moe-cuda",
        "--features",
        "cuda",
        "--lib",
        "elastic::",
    ]))?;
    // Every crate stands alone: its package (manifest, README, sources) builds from the packaged
    // files, path dependencies resolved through their versions.
    run(cargo().args([
        "package",
        "--workspace",
        "--exclude",
        "xtask",
        "--allow-dirty",
    ]))?;
    msrv(&pkgs)?;
    if !args.iter().any(|a| a == "--no-loom") {
        for pkg in loom_packages(&pkgs) {
            // A separate target dir keeps the cfg(loom) build from invalidating the normal one.
            run(cargo()
                .args([
                    "test",
                    "--release",
                    "--package",
                    &pkg,
                    "--target-dir",
                    "target/loom",
                ])
                .args(["--", "loom"])
                .env("RUSTFLAGS", "--cfg loom")
                .env("LOOM_MAX_PREEMPTIONS", "3"))?;
        }
    }
    eprintln!("xtask: ci passed");
    Ok(())
}

/// The declared `rust-version` must cover every locked dependency that a build or test on this
/// host uses (normal, build and dev edges, CUDA features included): no toolchain older than the
/// current one can be installed here, so the claim is checked against the lockfile instead.
/// `cfg(loom)` builds are excluded (loom's `generator` needs a newer compiler; they run on the
/// current toolchain).
fn msrv(pkgs: &[Value]) -> Result<()> {
    let parse = |v: &str| -> Vec<u64> { v.split('.').filter_map(|x| x.parse().ok()).collect() };
    let declared: Vec<u64> = pkgs
        .iter()
        .find_map(|p| p["rust_version"].as_str())
        .map(parse)
        .context("no workspace package declares a rust-version")?;
    let meta = cargo()
        .args(["metadata", "--format-version", "1"])
        .output()
        .context("cargo metadata")?;
    let meta: Value = serde_json::from_slice(&meta.stdout)?;
    let host = String::from_utf8(
        Command::new("rustc")
            .args(["--print", "host-tuple"])
            .output()?
            .stdout,
    )?;
    let tree = cargo()
        .args([
            "tree",
            "--workspace",
            "-e",
            "normal,dev,build",
            "--prefix",
            "none",
        ])
        .args(["--format", "{p}", "--target", host.trim()])
        .args(["--features"])
        .arg(cuda_features(pkgs).join(","))
        .output()
        .context("cargo tree")?;
    let used: std::collections::BTreeSet<String> = String::from_utf8_lossy(&tree.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(format!(
                "{} {}",
                w.next()?,
                w.next()?.trim_start_matches('v')
            ))
        })
        .collect();
    let mut worst: Option<(Vec<u64>, String)> = None;
    for p in meta["packages"].as_array().into_iter().flatten() {
        if p["source"].is_null() {
            continue; // our own crates carry the declared version
        }
        let id = format!(
            "{} {}",
            p["name"].as_str().unwrap_or_default(),
            p["version"].as_str().unwrap_or_default()
        );
        if let (true, Some(rv)) = (used.contains(&id), p["rust_version"].as_str()) {
            let rv = parse(rv);
            if worst.as_ref().is_none_or(|(w, _)| rv > *w) {
                worst = Some((rv, id));
            }
        }
    }
    if let Some((rv, id)) = worst {
        if rv > declared {
            bail!(
                "{id} needs Rust {rv:?} but the workspace declares rust-version {declared:?}; \
                 raise it in Cargo.toml or pin an older {id}"
            );
        }
        eprintln!("xtask: rust-version {declared:?} covers the lockfile (highest: {id}, {rv:?})");
    }
    Ok(())
}

/// Build the hardware-in-the-loop bundle: every test target named `gpu*` and every example named
/// `hil_*` of the crates with a `cuda` feature, built with that feature, plus the `elasticmoe`
/// binary, and a `run.sh` that runs them all.
fn hil(root: &Path, args: &[String]) -> Result<()> {
    let run_after = args.iter().any(|a| a == "--run");
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned();
    let pkgs = packages()?;
    let cuda = cuda_features(&pkgs);
    if cuda.is_empty() {
        bail!("no crate declares a `cuda` feature yet; nothing to put in the bundle");
    }
    let out_dir = root.join("target/hil");
    let bin_dir = out_dir.join("bin");
    if out_dir.exists() {
        std::fs::remove_dir_all(&out_dir)?;
    }
    std::fs::create_dir_all(&bin_dir)?;

    let mut built: Vec<(String, PathBuf)> = Vec::new();
    for p in &pkgs {
        let name = p["name"].as_str().unwrap_or_default();
        if p["features"].get("cuda").is_none() {
            continue;
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let tname = t["name"].as_str().unwrap_or_default();
            let kinds: Vec<&str> = t["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let (flag, wanted) = if kinds.contains(&"test") && tname.starts_with("gpu") {
                ("--test", true)
            } else if kinds.contains(&"example") && tname.starts_with("hil_") {
                ("--example", true)
            } else if kinds.contains(&"bin") && name == "elasticmoe" {
                ("--bin", true)
            } else {
                ("", false)
            };
            if !wanted {
                continue;
            }
            let sub = if flag == "--test" { "test" } else { "build" };
            let mut cmd = cargo();
            cmd.args([sub, "--profile", "gpu", "--package", name, flag, tname])
                .args(["--features", &format!("{name}/cuda")])
                .args(["--message-format", "json-render-diagnostics"]);
            if sub == "test" {
                cmd.arg("--no-run");
            }
            eprintln!("xtask: building {cmd:?}");
            let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
            if !out.status.success() {
                bail!("building {name} {flag} {tname} failed");
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let Ok(msg) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == tname {
                    if let Some(exe) = msg["executable"].as_str() {
                        let label =
                            format!("{}{}", if flag == "--test" { "test-" } else { "" }, tname);
                        let dest = bin_dir.join(&label);
                        std::fs::copy(exe, &dest)
                            .with_context(|| format!("copying {exe} to the bundle"))?;
                        built.push((label, dest));
                    }
                }
            }
        }
    }
    let mut script = String::from(HIL_HEADER);
    for (label, _) in &built {
        if label == "elasticmoe" {
            continue;
        }
        if label.starts_with("test-") {
            // GPU tests share one device set: run them one at a time, and show their output.
            script.push_str(&format!("step {label} --test-threads=1 --nocapture\n"));
        } else {
            script.push_str(&format!("step {label}\n"));
        }
    }
    script.push_str(HIL_FOOTER);
    let run_sh = out_dir.join("run.sh");
    std::fs::write(&run_sh, script)?;
    if built.iter().any(|(label, _)| label == "elasticmoe") {
        std::fs::write(out_dir.join("scale.sh"), HIL_SCALE)?;
    }
    let total: u64 = built
        .iter()
        .filter_map(|(_, p)| p.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "xtask: bundle at {} ({} binaries, {:.1} MiB)",
        out_dir.display(),
        built.len(),
        total as f64 / (1 << 20) as f64
    );
    if total > 60 << 20 {
        bail!("the bundle is over 60 MiB; the GPU machine takes at most 64 MiB");
    }
    if run_after {
        let mut cmd = Command::new("bash");
        cmd.arg(&run_sh);
        if let Some(f) = filter {
            cmd.arg(f);
        }
        run(&mut cmd)?;
    }
    Ok(())
}

const HIL_HEADER: &str = r#"#!/usr/bin/env bash
# Generated by `cargo xtask hil`. Runs every GPU test and benchmark in this bundle.
# Usage: bash target/hil/run.sh [FILTER]   (FILTER: a substring of the step names to run)
# Results: JSON files go to $HIL_RESULTS (default target/hil/results); with $OUT set, the log
# and a tarball of the results are copied under $OUT.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
filter="${1:-}"
export HIL_RESULTS="${HIL_RESULTS:-$here/results}"
mkdir -p "$HIL_RESULTS"
log="$HIL_RESULTS/hil.log"
: > "$log"
failed=0
export PATH="$here/bin:$PATH"
# A GPU test or benchmark without its GPUs fails instead of passing: demand every GPU this machine
# has (a machine without the driver demands none, and its sections are logged as SKIPPED).
export HIL_REQUIRE_GPUS="${HIL_REQUIRE_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}"
{ echo "== host: $(hostname) $(date -u +%FT%TZ), HIL_REQUIRE_GPUS=$HIL_REQUIRE_GPUS"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1; } | tee -a "$log"
skipped=0
step() {
  local name="$1"; shift
  if [ -n "$filter" ] && [[ "$name" != *"$filter"* ]]; then return; fi
  echo "== step $name" | tee -a "$log"
  local t0=$(date +%s%N) slog="$HIL_RESULTS/.step.log"
  if (cd "$HIL_RESULTS" && "$here/bin/$name" "$@") 2>&1 | tee "$slog" | tee -a "$log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
    if grep -q '^SKIPPED' "$slog"; then
      echo "== SKIPPED $name ($(grep -c '^SKIPPED' "$slog") section(s) skipped)" | tee -a "$log"; skipped=$((skipped+1))
    else
      echo "== ok $name ($(( ($(date +%s%N) - t0) / 1000000 )) ms)" | tee -a "$log"
    fi
  else
    echo "== FAILED $name" | tee -a "$log"; failed=$((failed+1))
  fi
}
"#;

/// The elastic scaling benchmark (issue 11): synthetic checkpoints on local disk, then
/// `elasticmoe bench scale` on every GPU of the machine.
const HIL_SCALE: &str = r#"#!/usr/bin/env bash
# Generated by `cargo xtask hil`. The elastic scaling benchmark (issue 11) on every GPU here.
# Usage: bash target/hil/scale.sh
# Env: SCALE_MODELS (default "deepseek-v2-lite:8 qwen3-30b-a3b:8", preset:layers),
#      SCALE_DEVICES (default: every GPU once; "0,0" runs two logical ranks on GPU 0),
#      SCALE_STEPS (default 1-2,2-1), SCALE_STRATEGIES (default elastic,cold-restart,colocated),
#      SCALE_ARGS (more bench flags), MODEL_DIR (default /tmp/elasticmoe-models, local disk),
#      KEEP_MODELS (set: keep the checkpoints). Progress lines carry times (ELASTICMOE_TRACE).
# Writes scale/PRESET/{scaling.json,scaling.svg}, PRESET.log, and scale/scaling.json (one entry
# per model: the format of docs/benchmarks/data/scaling.json) under target/hil/results, or, with
# $OUT set (the device tool, which brings back only a few files), under /tmp/elasticmoe-scale
# and then as ONE tarball $OUT/scale.tgz plus a copy of the combined $OUT/scaling.json.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
final="${OUT:-}"
if [ -n "$final" ]; then out=/tmp/elasticmoe-scale; else out="$here/results/scale"; fi
models="${MODEL_DIR:-/tmp/elasticmoe-models}"
export ELASTICMOE_TRACE="${ELASTICMOE_TRACE:-1}"
mkdir -p "$out" "$models"
gpus=$(nvidia-smi -L | wc -l)
# SCALE_DEVICES (a GPU list, e.g. 0,0,0,0 for four logical ranks on GPU 0) overrides "every GPU".
devs="${SCALE_DEVICES:-$(seq -s, 0 $((gpus - 1)))}"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$out/gpus.csv"
failed=0
for spec in ${SCALE_MODELS:-deepseek-v2-lite:8 qwen3-30b-a3b:8}; do
  preset="${spec%%:*}"; layers="${spec##*:}"
  dir="$models/$preset"
  if [ ! -f "$dir/config.json" ]; then
    t0=$(date +%s)
    if ! "$here/bin/elasticmoe" gen-model --preset "$preset" --layers "$layers" --out "$dir" > "$out/$preset.gen.log" 2>&1; then
      echo "== FAILED gen-model $preset"; tail -5 "$out/$preset.gen.log"; failed=$((failed+1)); continue
    fi
    echo "== gen-model $preset ($layers layers): $(( $(date +%s) - t0 )) s, $(du -sh "$dir" | cut -f1)"
  fi
  echo "== bench scale $preset on cuda:$devs"
  "$here/bin/elasticmoe" bench scale --model "$dir" --devices "cuda:$devs" \
    --steps "${SCALE_STEPS:-1-2,2-1}" --strategies "${SCALE_STRATEGIES:-elastic,cold-restart,colocated}" \
    --out "$out/$preset" --append "$out/scaling.json" ${SCALE_ARGS:-} 2>&1 | tee "$out/$preset.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "== FAILED bench scale $preset"; failed=$((failed+1)); }
  [ -n "${KEEP_MODELS:-}" ] || rm -rf "$dir"
done
echo "== scale done: $failed failure(s)"
if [ -n "$final" ]; then
  mkdir -p "$final"
  tar -czf "$final/scale.tgz" -C "$out" . && echo "== results in $final/scale.tgz"
  cp "$out/scaling.json" "$final/scaling.json" 2>/dev/null
fi
exit $((failed > 0))
"#;

const HIL_FOOTER: &str = r#"
echo "== done: $failed failed step(s), $skipped skipped step(s)" | tee -a "$log"
if [ -n "${OUT:-}" ]; then
  cp "$log" "$OUT/hil.log"
  tar -czf "$OUT/results.tar.gz" -C "$HIL_RESULTS" .
fi
exit $((failed > 0))
"#;
