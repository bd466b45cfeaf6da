//! Post-hoc EMA end to end: train a noisy linear regression with SGD, record two
//! power-function EMAs (EDM2's sigma_rel 0.05 and 0.10) as snapshots, then synthesize EMAs of
//! other lengths after training and pick the best by validation loss.
//!
//! As a check, a third EMA (sigma_rel 0.08) is tracked directly during training and compared
//! with its synthesis. Writes `posthoc.png` (validation loss against sigma_rel) and
//! `posthoc.csv` into the output directory.
//!
//! ```text
//! cargo run --release --example posthoc [-- --out target/posthoc --steps 3000]
//! ```

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use wgpu_ema::checkpoint::Checkpoint;
use wgpu_ema::posthoc::{self, Recorder, SnapshotSet};
use wgpu_ema::{GpuContext, GpuEma, ParamArena, Schedule, TensorSpec};

type Error = Box<dyn std::error::Error>;

const FEATURES: usize = 64;
const BATCH: usize = 8;
const LR: f32 = 0.004;
const NOISE: f32 = 0.5;
const CHECK_SIGMA: f64 = 0.08;

/// Seeded normal samples (Box-Muller).
struct Gauss(fastrand::Rng);
impl Gauss {
    fn next(&mut self) -> f32 {
        let u = self.0.f64().max(1e-300);
        let v = self.0.f64();
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

/// The regression: `y = x . w_true + b_true + noise`.
struct Task {
    w_true: Vec<f32>,
    b_true: f32,
    rng: Gauss,
}

impl Task {
    fn sample(&mut self) -> (Vec<f32>, f32) {
        let x: Vec<f32> = (0..FEATURES).map(|_| self.rng.next()).collect();
        let y = dot(&x, &self.w_true) + self.b_true + NOISE * self.rng.next();
        (x, y)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Mean squared error of weights `w`, bias `b` on `set`.
fn loss(set: &[(Vec<f32>, f32)], w: &[f32], b: f32) -> f64 {
    set.iter()
        .map(|(x, y)| ((dot(x, w) + b - y) as f64).powi(2))
        .sum::<f64>()
        / set.len() as f64
}

struct Args {
    out: PathBuf,
    steps: u64,
    every: u64,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        out: PathBuf::from("target/posthoc"),
        steps: 3000,
        every: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => a.out = PathBuf::from(value()?),
            "--steps" => a.steps = value()?.parse()?,
            "--every" => a.every = value()?.parse()?,
            _ => return Err(format!("unknown argument {flag}").into()),
        }
    }
    Ok(a)
}

fn main() -> Result<(), Error> {
    let args = parse_args()?;
    let snaps = args.out.join("snapshots");
    let _ = std::fs::remove_dir_all(&snaps);
    std::fs::create_dir_all(&args.out)?;
    let ctx = GpuContext::new()?;
    println!("GPU: {}", ctx.describe());

    let mut g = Gauss(fastrand::Rng::with_seed(7));
    let w_true: Vec<f32> = (0..FEATURES).map(|_| g.next()).collect();
    let mut task = Task {
        w_true,
        b_true: 0.5,
        rng: g,
    };
    let val: Vec<(Vec<f32>, f32)> = (0..4096).map(|_| task.sample()).collect();

    // The model's parameters live in a GPU arena; the optimizer step runs on the host here and
    // uploads them (a real trainer's step would write them on the GPU).
    let specs = [
        TensorSpec::new("linear.weight", [FEATURES]),
        TensorSpec::new("linear.bias", []),
    ];
    let params = ParamArena::new(&ctx.device, specs)?;
    let mut w = vec![0.0f32; FEATURES];
    let mut b = 0.0f32;
    let upload = |w: &[f32], b: f32| -> wgpu_ema::Result<()> {
        params.write(&ctx.queue, "linear.weight", w)?;
        params.write(&ctx.queue, "linear.bias", &[b])
    };
    upload(&w, b)?;
    let mut ema = posthoc::builder(&posthoc::EDM2_SIGMA_RELS)?
        .track_arena(&params)
        .build(&ctx.device, &ctx.queue)?;
    let mut check = GpuEma::builder(Schedule::power_sigma_rel(CHECK_SIGMA)?)
        .track_arena(&params)
        .build(&ctx.device, &ctx.queue)?;
    let mut recorder = Recorder::open(&snaps, args.every)?;

    let bar = ProgressBar::new(args.steps);
    bar.set_style(ProgressStyle::with_template(
        "training [{bar:40}] {pos}/{len} steps ({per_sec}) {msg}",
    )?);
    for _ in 0..args.steps {
        let mut gw = vec![0.0f32; FEATURES];
        let mut gb = 0.0f32;
        for _ in 0..BATCH {
            let (x, y) = task.sample();
            let err = dot(&x, &w) + b - y;
            for (g, xi) in gw.iter_mut().zip(&x) {
                *g += 2.0 * err * xi / BATCH as f32;
            }
            gb += 2.0 * err / BATCH as f32;
        }
        for (wi, g) in w.iter_mut().zip(&gw) {
            *wi -= LR * g;
        }
        b -= LR * gb;
        upload(&w, b)?;
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        ema.record_update(&mut enc)?;
        check.record_update(&mut enc)?;
        ctx.queue.submit(Some(enc.finish()));
        if let Some(i) = recorder.after_update(&ema)? {
            bar.set_message(format!("snapshot {i}"));
        }
        bar.inc(1);
    }
    recorder.finish()?;
    bar.finish();
    let raw_loss = loss(&val, &w, b);

    let set = SnapshotSet::open(&snaps)?;
    println!(
        "{} snapshots x {} profiles in {}",
        set.snapshots().len(),
        posthoc::EDM2_SIGMA_RELS.len(),
        snaps.display()
    );
    let eval = |path: &std::path::Path| -> Result<f64, Error> {
        let c = Checkpoint::load(path)?;
        let (_, w) = c.get("linear.weight").ok_or("no weight")?;
        let (_, b) = c.get("linear.bias").ok_or("no bias")?;
        Ok(loss(&val, w, b[0]))
    };

    // The check: the synthesized sigma_rel 0.08 against the one tracked during training.
    let wts = set.weights(CHECK_SIGMA, None)?;
    let synth_path = args.out.join("ema-0.08.safetensors");
    set.synthesize(&wts, &synth_path, &|_, _| {})?;
    let synth = Checkpoint::load(&synth_path)?;
    let direct = check.read_shadows_blocking()?;
    let a = ema.read_ema_blocking(0)?;
    let c = ema.read_ema_blocking(1)?;
    let (mut err, mut spread) = (0.0f64, 0.0f64);
    for name in ["linear.weight", "linear.bias"] {
        let (_, s) = synth.get(name).ok_or("missing")?;
        let d = direct.try_get(name)?;
        for ((s, d), (x, y)) in s
            .iter()
            .zip(d)
            .zip(a.try_get(name)?.iter().zip(c.try_get(name)?))
        {
            err += ((s - d) as f64).powi(2);
            spread += ((x - y) as f64).powi(2);
        }
    }
    println!(
        "check: sigma_rel {CHECK_SIGMA} synthesized vs tracked directly: rms error {:.3e}, \
         {:.4} of the distance between the two recorded profiles ({} terms)",
        (err / (FEATURES + 1) as f64).sqrt(),
        (err / spread).sqrt(),
        wts.terms.len()
    );

    // The sweep EDM2 picks the length with.
    let sigmas: Vec<f64> = (1..=27).map(|i| 0.01 * i as f64 + 0.005).collect();
    let mut rows = Vec::new();
    let tmp = args.out.join("sweep.safetensors");
    for &s in &sigmas {
        let wts = set.weights(s, None)?;
        set.synthesize(&wts, &tmp, &|_, _| {})?;
        rows.push((s, eval(&tmp)?));
    }
    let _ = std::fs::remove_file(&tmp);
    let best = rows
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or("no rows")?;
    let mut csv = String::from("sigma_rel,validation_mse\n");
    for (s, l) in &rows {
        csv.push_str(&format!("{s:.3},{l:.6}\n"));
    }
    std::fs::write(args.out.join("posthoc.csv"), csv)?;
    let recorded: Vec<(f64, f64)> = [
        (0.05, ema.read_ema_blocking(0)?),
        (0.10, ema.read_ema_blocking(1)?),
    ]
    .into_iter()
    .map(|(s, t)| {
        let w = t.try_get("linear.weight")?;
        let b = t.try_get("linear.bias")?;
        Ok((s, loss(&val, w, b[0])))
    })
    .collect::<wgpu_ema::Result<_>>()?;
    println!("validation MSE (noise floor {:.4}):", NOISE * NOISE);
    println!("  raw weights            {raw_loss:.5}");
    for (s, l) in &recorded {
        println!("  recorded sigma_rel {s:.2} {l:.5}");
    }
    println!("  synthesized sigma_rel 0.08 {:.5}", eval(&synth_path)?);
    println!("  best synthesized: sigma_rel {:.3}, {:.5}", best.0, best.1);
    let png = args.out.join("posthoc.png");
    let direct_loss = loss(
        &val,
        direct.try_get("linear.weight")?,
        direct.try_get("linear.bias")?[0],
    );
    println!("  tracked directly sigma_rel 0.08 {direct_loss:.5}");
    plot(
        &png,
        &rows,
        &recorded,
        (CHECK_SIGMA, direct_loss),
        raw_loss,
        NOISE as f64 * NOISE as f64,
    )?;
    println!("wrote {} and posthoc.csv", png.display());
    Ok(())
}

fn plot(
    path: &std::path::Path,
    rows: &[(f64, f64)],
    recorded: &[(f64, f64)],
    direct: (f64, f64),
    raw: f64,
    floor: f64,
) -> Result<(), Error> {
    use plotters::prelude::*;
    static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "bad font")?;
    let ymax = rows.iter().map(|r| r.1).fold(raw, f64::max);
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Post-hoc EMA: validation loss against EMA length (synthesized from 2 profiles)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            0.0..0.29f64,
            floor - 0.1 * (ymax - floor)..ymax + 0.1 * (ymax - floor),
        )?;
    chart
        .configure_mesh()
        .x_desc("sigma_rel")
        .y_desc("validation MSE")
        .label_style(("sans-serif", 13))
        .draw()?;
    chart
        .draw_series(LineSeries::new(rows.to_vec(), BLUE.stroke_width(2)))?
        .label("synthesized after training")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart.draw_series(rows.iter().map(|&xy| Circle::new(xy, 3, BLUE.filled())))?;
    chart
        .draw_series(
            recorded
                .iter()
                .map(|&xy| Circle::new(xy, 7, RED.stroke_width(2))),
        )?
        .label("recorded during training")
        .legend(|(x, y)| Circle::new((x + 10, y), 6, RED.stroke_width(2)));
    chart
        .draw_series(std::iter::once(Cross::new(
            direct,
            8,
            GREEN.stroke_width(2),
        )))?
        .label("tracked directly (the check)")
        .legend(|(x, y)| Cross::new((x + 10, y), 6, GREEN.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, raw), (0.29, raw)],
            BLACK.stroke_width(1),
        ))?
        .label("raw weights (no EMA)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, floor), (0.29, floor)],
            RGBColor(150, 150, 150).stroke_width(1),
        ))?
        .label("noise floor")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(150, 150, 150)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}
