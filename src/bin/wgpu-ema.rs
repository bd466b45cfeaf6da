//! `wgpu-ema`: post-hoc EMA synthesis and checkpoint inspection from the shell.
//!
//! ```text
//! wgpu-ema posthoc snapshots/ --sigma-rel 0.08 -o ema-0.08.safetensors
//! wgpu-ema snapshots snapshots/
//! wgpu-ema inspect checkpoint.safetensors
//! wgpu-ema consolidate ranks/ -o model.safetensors
//! wgpu-ema reshard ranks/ --ranks 4 -o ranks4/
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use wgpu_ema::checkpoint::ranks::RankedCheckpoint;
use wgpu_ema::checkpoint::{Checkpoint, TensorFile, COMPENSATION_SUFFIX};
use wgpu_ema::names::ANCHOR_SUFFIX;
use wgpu_ema::posthoc::{SnapshotSet, Weights};
use wgpu_ema::EMA_SUFFIX;

/// `println!` that returns the write's error instead of panicking: `wgpu-ema ... | head`
/// closes the pipe early, which ends the command quietly.
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)?
    };
}

#[derive(Parser)]
#[command(
    name = "wgpu-ema",
    version,
    about = "EMA checkpoints: post-hoc synthesis and inspection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Synthesizes the EMA of other lengths from a directory of post-hoc snapshots (EDM2).
    Posthoc {
        /// The snapshot directory (phema-*.safetensors).
        dir: PathBuf,
        /// The wanted EMA length(s), as sigma_rel in (0, 0.2887); repeat for several.
        #[arg(long = "sigma-rel", required = true, num_args = 1..)]
        sigma_rel: Vec<f64>,
        /// The step to synthesize at, a snapshot's (default: the last); only snapshots up to
        /// it are used.
        #[arg(long)]
        step: Option<u64>,
        /// The output safetensors file. With several --sigma-rel, `{sigma}` in it is replaced
        /// by each value (or `-<sigma>` is added before the extension).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print the weights only; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Accept gaps in the snapshots' numbering (snapshots deleted on purpose), listing
        /// the missing ones.
        #[arg(long)]
        allow_gaps: bool,
    },
    /// Lists the snapshots of a directory and checks they fit together.
    Snapshots {
        /// The snapshot directory.
        dir: PathBuf,
        /// Accept gaps in the snapshots' numbering, listing the missing ones.
        #[arg(long)]
        allow_gaps: bool,
    },
    /// Shows a checkpoint's tensors (names, dtypes, shapes), metadata and the EMAs it holds.
    Inspect {
        /// A .safetensors file, a sharded checkpoint's index.json, a TensorFlow checkpoint
        /// (prefix, .index, or its `checkpoint` state file), or a folder holding one.
        file: PathBuf,
        /// List every tensor, not only the first 40.
        #[arg(long)]
        all: bool,
        /// Read a file without wgpu-ema's checksums (another tool's): nothing in it can be
        /// verified.
        #[arg(long)]
        allow_unverified: bool,
    },
    /// Joins the committed save of a ranked checkpoint (one file per rank) into one training
    /// checkpoint of the whole model: global names and shapes, what a single process restores
    /// and PyTorch loads.
    Consolidate {
        /// The folder holding the ranks' files and their index (wgpu-ema-ranks.json).
        dir: PathBuf,
        /// The output: a .safetensors file, or with --max-shard-size a folder of Hugging Face
        /// shards.
        #[arg(short, long)]
        output: PathBuf,
        /// Write Hugging Face shards of at most this many bytes each into the output folder.
        #[arg(long)]
        max_shard_size: Option<u64>,
    },
    /// Rewrites the committed save of a ranked checkpoint for another number of ranks (each
    /// tensor cut evenly), reading only the ranges each new rank needs.
    Reshard {
        /// The folder holding the ranks' files and their index.
        dir: PathBuf,
        /// The number of ranks to write.
        #[arg(long)]
        ranks: usize,
        /// The output folder (its index commits the new files).
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Posthoc {
            dir,
            sigma_rel,
            step,
            output,
            dry_run,
            allow_gaps,
        } => posthoc(
            &dir,
            &sigma_rel,
            step,
            output.as_deref(),
            dry_run,
            allow_gaps,
        ),
        Command::Snapshots { dir, allow_gaps } => {
            let set = open_set(&dir, allow_gaps)?;
            out!(
                "{} snapshots in {}, {} tensors each profile:",
                set.snapshots().len(),
                dir.display(),
                set.specs().len()
            );
            out!(
                "{:>6} {:>12}  {:<5} profiles (sigma_rel, gamma)",
                "index",
                "step",
                "dtype"
            );
            for s in set.snapshots() {
                let p: Vec<String> = s
                    .profiles
                    .iter()
                    .map(|p| format!("{:.4} ({:.3})", p.sigma_rel, p.gamma))
                    .collect();
                out!(
                    "{:>6} {:>12}  {:<5} {}",
                    s.index,
                    s.t,
                    format!("{:?}", s.dtype),
                    p.join(", ")
                );
            }
            let params: u64 = set.specs().iter().map(|s| s.numel()).sum();
            out!(
                "{params} parameters; consistent: one run, every file verified, same profiles, \
                 tensors, shapes and dtype in every snapshot"
            );
            Ok(())
        }
        Command::Inspect {
            file,
            all,
            allow_unverified,
        } => inspect(&file, all, allow_unverified),
        Command::Consolidate {
            dir,
            output,
            max_shard_size,
        } => {
            let ck = RankedCheckpoint::open(&dir)?;
            let written = match max_shard_size {
                Some(max) => ck.consolidate_sharded(&output, max)?,
                None => {
                    ck.consolidate(&output)?;
                    output.clone()
                }
            };
            out!(
                "save {} of {} ranks ({} tensors) consolidated: {}",
                ck.save(),
                ck.ranks(),
                ck.names().count(),
                written.display()
            );
            Ok(())
        }
        Command::Reshard { dir, ranks, output } => {
            if ranks == 0 {
                return Err("--ranks must be at least 1".into());
            }
            let ck = RankedCheckpoint::open(&dir)?;
            let index = ck.reshard(&output, ranks)?;
            out!(
                "save {} of {} ranks resharded into {ranks}: {}",
                ck.save(),
                ck.ranks(),
                index.display()
            );
            Ok(())
        }
    }
}

fn output_for(template: Option<&Path>, sigma: f64, several: bool) -> PathBuf {
    let template = template.map_or_else(
        || PathBuf::from("ema-{sigma}.safetensors"),
        Path::to_path_buf,
    );
    let text = template.to_string_lossy();
    let s = format!("{sigma}");
    if text.contains("{sigma}") {
        return PathBuf::from(text.replace("{sigma}", &s));
    }
    if !several {
        return template;
    }
    let stem = template
        .file_stem()
        .map(|x| x.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = template
        .extension()
        .map(|x| format!(".{}", x.to_string_lossy()))
        .unwrap_or_default();
    template.with_file_name(format!("{stem}-{s}{ext}"))
}

fn print_weights(set: &SnapshotSet, w: &Weights) -> std::io::Result<()> {
    out!(
        "sigma_rel {} (gamma {:.4}) at step {}: {} terms",
        w.sigma_rel,
        w.gamma,
        w.t,
        w.terms.len()
    );
    out!(
        "{:>6} {:>12} {:>10} {:>14}",
        "index",
        "step",
        "sigma_rel",
        "weight"
    );
    for term in &w.terms {
        let s = &set.snapshots()[term.snapshot];
        out!(
            "{:>6} {:>12} {:>10.4} {:>14.6e}",
            s.index,
            term.t,
            s.profiles[term.profile].sigma_rel,
            term.weight
        );
    }
    Ok(())
}

/// The snapshot set of `dir`; with `allow_gaps`, the missing numbers are said on stderr.
fn open_set(dir: &Path, allow_gaps: bool) -> Result<SnapshotSet, Box<dyn std::error::Error>> {
    if !allow_gaps {
        return Ok(SnapshotSet::open(dir)?);
    }
    let set = SnapshotSet::open_allowing_gaps(dir)?;
    if !set.missing().is_empty() {
        let m: Vec<String> = set.missing().iter().map(|i| i.to_string()).collect();
        eprintln!(
            "warning: snapshot number(s) {} missing (--allow-gaps)",
            m.join(", ")
        );
    }
    Ok(set)
}

/// Refuses an output that would replace a file of the snapshot set (or land among its
/// snapshots under a snapshot's name): the set would no longer be one recording.
fn check_output(set: &SnapshotSet, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let out_dir = canon(
        out.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    );
    let in_set_dir = out_dir.is_some() && out_dir == canon(set.dir());
    let is_snapshot_name = out
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("phema-"));
    let replaces = set
        .snapshots()
        .iter()
        .any(|s| canon(&s.path).is_some_and(|p| Some(p) == canon(out)));
    if replaces || (in_set_dir && is_snapshot_name) {
        return Err(format!(
            "refusing to write {}: it would replace or join the snapshots of {}; write the \
             synthesized EMA elsewhere",
            out.display(),
            set.dir().display()
        )
        .into());
    }
    Ok(())
}

fn posthoc(
    dir: &Path,
    sigmas: &[f64],
    step: Option<u64>,
    output: Option<&Path>,
    dry_run: bool,
    allow_gaps: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let set = open_set(dir, allow_gaps)?;
    // Every target is checked before anything is written.
    let weights: Vec<Weights> = sigmas
        .iter()
        .map(|&s| set.weights(s, step))
        .collect::<Result<_, _>>()?;
    if !dry_run {
        for w in &weights {
            check_output(&set, &output_for(output, w.sigma_rel, sigmas.len() > 1))?;
        }
    }
    for w in &weights {
        print_weights(&set, w)?;
        if dry_run {
            continue;
        }
        let out = output_for(output, w.sigma_rel, sigmas.len() > 1);
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(format!("sigma_rel {}", w.sigma_rel));
        let start = std::time::Instant::now();
        set.synthesize(w, &out, &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })?;
        bar.finish_and_clear();
        out!(
            "wrote {} in {:.2} s",
            out.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// What each tensor of a checkpoint is, by its name's ending.
fn kind_of(name: &str) -> String {
    if name.ends_with(COMPENSATION_SUFFIX) {
        return "compensation terms".into();
    }
    if name.ends_with(&format!("{EMA_SUFFIX}{ANCHOR_SUFFIX}")) {
        return "BEMA anchors (theta_0)".into();
    }
    if name.ends_with(EMA_SUFFIX) {
        return "EMA 0 shadows".into();
    }
    if let Some((_, k)) = name.rsplit_once(&format!("{EMA_SUFFIX}_")) {
        if k.chars().all(|c| c.is_ascii_digit()) {
            return format!("EMA {k} shadows");
        }
    }
    "other tensors (parameters, weights, optimizer state)".into()
}

/// A tensor as `inspect` lists it: name, dtype, shape.
type Listed = (String, String, Vec<usize>);

fn inspect(
    path: &Path,
    all: bool,
    allow_unverified: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let resolved = wgpu_ema::checkpoint::resolve(path)?;
    if resolved != path {
        out!("{} names {}", path.display(), resolved.display());
    }
    let path = resolved.as_path();
    // (name, dtype, shape) of every tensor, and the metadata.
    let (tensors, metadata, checks): (Vec<Listed>, _, &str) = if path
        .extension()
        .is_some_and(|e| e == "safetensors")
    {
        let f = if allow_unverified {
            TensorFile::open_unverified(path)?
        } else {
            TensorFile::open(path)?
        };
        let list = f
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dtype.clone(), t.shape.clone()))
            .collect();
        let checks = if f.has_checksums() {
            "wgpu-ema checksums present (metadata verified; tensors are verified when read)"
        } else {
            "UNVERIFIED: no wgpu-ema checksums (another tool's file, read with --allow-unverified)"
        };
        (list, f.metadata().clone(), checks)
    } else {
        let c = if allow_unverified {
            Checkpoint::load_unverified(path)?
        } else {
            Checkpoint::load(path)?
        };
        let list = c
            .names()
            .filter_map(|n| {
                c.get(n)
                    .map(|(s, _)| (n.to_string(), "F32".to_string(), s.to_vec()))
            })
            .collect();
        let checks = if c.verified() {
            "every checksum verified"
        } else {
            "UNVERIFIED: no wgpu-ema checksums (read with --allow-unverified)"
        };
        (list, c.metadata().clone(), checks)
    };
    out!("{}: {} tensors; {checks}", path.display(), tensors.len());
    let mut meta: Vec<_> = metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "wgpu_ema_crc32c")
        .collect();
    meta.sort();
    if !meta.is_empty() {
        out!("metadata:");
        for (k, v) in meta {
            let v = if v.len() > 200 {
                format!(
                    "{}... ({} chars)",
                    &v[..v.char_indices().nth(200).map_or(v.len(), |(i, _)| i)],
                    v.len()
                )
            } else {
                v.clone()
            };
            out!("  {k}: {v}");
        }
    }
    let mut groups: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (name, _, shape) in &tensors {
        let g = groups.entry(kind_of(name)).or_default();
        g.0 += 1;
        g.1 += shape.iter().map(|&d| d as u64).product::<u64>();
    }
    out!("holds:");
    for (kind, (n, elems)) in &groups {
        out!("  {kind}: {n} tensors, {elems} elements");
    }
    out!("tensors:");
    for (name, dtype, shape) in tensors.iter().take(if all { usize::MAX } else { 40 }) {
        out!("  {name}  {dtype} {shape:?}");
    }
    if !all && tensors.len() > 40 {
        out!("  ... {} more (--all lists them)", tensors.len() - 40);
    }
    Ok(())
}
