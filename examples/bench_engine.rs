//! A long-lived engine process for `bench/run`: the Python driver keeps it open and
//! alternates its timings with onnxruntime's, round by round, so drift on a shared machine
//! hits both engines alike.
//!
//! One command a line on stdin, one JSON object a line on stdout:
//!
//! ```text
//! load <name> <model.onnx>          -> {"ok":true,"load_ms":..,"mc":bool,"mc_reason":..,"inputs":[..]}
//! input <name> <body.json>          -> {"ok":true,"rows":..}   (body as POST /predict takes it)
//! time <name> <variant> <reps>      -> {"ok":true,"us":[..one per rep..]}
//! stats <name> <samples> <seed>     -> {"ok":true,"max_std":..,"max_var":..}
//! rss                               -> {"ok":true,"vm_hwm_kb":..,"vm_rss_kb":..}
//! quit
//! ```
//!
//! Variants: `eval` (one eval pass), `mc:N` (MC-N as the server runs it: one batched pass of
//! N·B rows), `mcseq:N` (MC-N as N sequential passes of B rows). Every MC timing includes
//! mask sampling, input tiling and the summary statistics, as in the server. Errors answer
//! `{"ok":false,"error":..}` and the process carries on.
//!
//! `cargo build --release --example bench_engine`; run by `bench/run`.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use mcd_serve::engine::model::{InputRows, LoadedModel, McSamples};
use mcd_serve::engine::repo::load_model;
use mcd_serve::front::native::decode::parse_request;
use serde_json::{Value, json};

struct Entry {
    model: LoadedModel,
    batch: Option<InputRows>,
}

fn main() {
    let mut models: HashMap<String, Entry> = HashMap::new();
    let mut seed: u64 = 0;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        if words[0] == "quit" {
            break;
        }
        let answer = match command(&words, &mut models, &mut seed) {
            Ok(v) => v,
            Err(e) => json!({"ok": false, "error": e}),
        };
        writeln!(out, "{answer}").expect("stdout");
        out.flush().expect("stdout");
    }
}

fn command(words: &[&str], models: &mut HashMap<String, Entry>, seed: &mut u64) -> Result<Value, String> {
    let arg = |i: usize| {
        words
            .get(i)
            .copied()
            .ok_or_else(|| format!("`{}` needs more arguments", words[0]))
    };
    match words[0] {
        "load" => {
            let (name, path) = (arg(1)?, arg(2)?);
            let t = Instant::now();
            let model = load_model(name, Path::new(path))?;
            let load_ms = t.elapsed().as_secs_f64() * 1e3;
            let answer = json!({
                "ok": true,
                "load_ms": load_ms,
                "mc": model.mc_unavailable_reason().is_none(),
                "mc_reason": model.mc_unavailable_reason(),
                "inputs": model.inputs,
                "batch_symbol": model.batch_symbol,
            });
            models.insert(name.to_string(), Entry { model, batch: None });
            Ok(answer)
        }
        "input" => {
            let (name, path) = (arg(1)?, arg(2)?);
            let entry = models.get_mut(name).ok_or_else(|| format!("no model {name}"))?;
            let body = std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
            let tensors = parse_request(&entry.model, &body).map_err(|e| e.to_string())?;
            let batch = entry.model.input_rows(tensors).map_err(|e| e.to_string())?;
            let rows = batch.rows();
            entry.batch = Some(batch);
            Ok(json!({"ok": true, "rows": rows}))
        }
        "time" => {
            let (name, variant) = (arg(1)?, arg(2)?);
            let reps: usize = arg(3)?.parse().map_err(|e| format!("reps: {e}"))?;
            let entry = models.get(name).ok_or_else(|| format!("no model {name}"))?;
            let batch = entry.batch.as_ref().ok_or_else(|| format!("no input for {name}"))?;
            let (kind, n) = match variant.split_once(':') {
                Some((k, n)) => (k, Some(n.parse::<usize>().map_err(|e| format!("samples: {e}"))?)),
                None => (variant, None),
            };
            let mut us = Vec::with_capacity(reps);
            for _ in 0..reps {
                *seed += 1;
                let t = Instant::now();
                match (kind, n) {
                    ("eval", None) => {
                        std::hint::black_box(entry.model.eval_session().run(batch).map_err(|e| e.to_string())?);
                    }
                    ("mc", Some(n)) | ("mcseq", Some(n)) => {
                        let samples = McSamples::new(n).ok_or("mc samples must be at least 2")?;
                        let session = entry.model.mc_session().map_err(|e| e.to_string())?;
                        let result = if kind == "mc" {
                            session.run(batch, samples, *seed, false)
                        } else {
                            session.run_in_passes(batch, samples, *seed, false, 1)
                        };
                        std::hint::black_box(result.map_err(|e| e.to_string())?);
                    }
                    _ => return Err(format!("unknown variant {variant}")),
                }
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(json!({"ok": true, "us": us}))
        }
        "stats" => {
            let name = arg(1)?;
            let n: usize = arg(2)?.parse().map_err(|e| format!("samples: {e}"))?;
            let s: u64 = arg(3)?.parse().map_err(|e| format!("seed: {e}"))?;
            let entry = models.get(name).ok_or_else(|| format!("no model {name}"))?;
            let batch = entry.batch.as_ref().ok_or_else(|| format!("no input for {name}"))?;
            let samples = McSamples::new(n).ok_or("mc samples must be at least 2")?;
            let outs = entry
                .model
                .mc_session()
                .map_err(|e| e.to_string())?
                .run(batch, samples, s, false)
                .map_err(|e| e.to_string())?;
            let max = |f: fn(&mcd_serve::engine::model::McOutput) -> &Vec<f64>| {
                outs.iter().flat_map(|o| f(o).iter().copied()).fold(0.0f64, f64::max)
            };
            Ok(json!({"ok": true, "max_std": max(|o| &o.stats.std), "max_var": max(|o| &o.stats.variance)}))
        }
        "rss" => {
            let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
            let field = |key: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            Ok(json!({"ok": true, "vm_hwm_kb": field("VmHWM:"), "vm_rss_kb": field("VmRSS:")}))
        }
        other => Err(format!("unknown command {other}")),
    }
}
