//! Ranks in separate processes: each a process of this test binary (`rank_child`) with its own
//! device (lavapipe or llvmpipe here), keeping its part of one model, saving its file of each
//! save while the others do, rank 0 committing. The parent checks the committed save against
//! one EMA of the whole model (bit for bit), reshards it, and kills ranks mid-save.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{bits, gpu, random};
use wgpu_ema::checkpoint::ranks::{commit_ranks, save_rank, RankPlan, RankedCheckpoint};
use wgpu_ema::{GpuContext, GpuEma, HostTensors, ParamArena, Schedule, TensorSpec};

fn model() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("enc.weight", [211, 3]),
        TensorSpec::new("enc.bias", [211]),
        TensorSpec::new("head", [5]),
    ]
}

fn values(g: usize, t: u64) -> Vec<f32> {
    random(t * 7 + g as u64, model()[g].numel() as usize)
}

/// An EMA over `plan`'s part (the whole model for a plan of one rank keeping everything),
/// parameters written for step `t` by `write(t)`.
struct Part {
    arena: ParamArena,
    ema: GpuEma,
    plan: RankPlan,
}

impl Part {
    fn new(ctx: &GpuContext, plan: RankPlan) -> Self {
        let arena = ParamArena::new(&ctx.device, plan.local_specs()).unwrap();
        let part = |arena: &ParamArena| {
            for p in plan.pieces() {
                let g = model().iter().position(|s| s.name == p.global).unwrap();
                let v = values(g, 0);
                arena
                    .write(
                        &ctx.queue,
                        &p.global,
                        &v[p.start as usize..(p.start + p.len) as usize],
                    )
                    .unwrap();
            }
        };
        part(&arena);
        let ema = GpuEma::builder(Schedule::tf(0.95))
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)
            .unwrap();
        Self { arena, ema, plan }
    }

    fn step(&mut self, ctx: &GpuContext, t: u64) {
        for p in self.plan.pieces() {
            let g = model().iter().position(|s| s.name == p.global).unwrap();
            let v = values(g, t);
            self.arena
                .write(
                    &ctx.queue,
                    &p.global,
                    &v[p.start as usize..(p.start + p.len) as usize],
                )
                .unwrap();
        }
        self.ema.update().unwrap();
    }

    fn save(&self, dir: &Path, save: u64) {
        let snapshot = self.ema.snapshot(true).unwrap();
        save_rank(dir, &snapshot, None, &HostTensors::new(), &self.plan, save).unwrap();
    }
}

/// A rank, when this binary runs as one (the parent sets `WGPU_EMA_RANK_CHILD`): steps 1..=
/// `STEPS` (forever for 0), saving every `EVERY` steps; rank 0 commits each save.
#[test]
fn rank_child() {
    let Ok(spec) = std::env::var("WGPU_EMA_RANK_CHILD") else {
        return;
    };
    let num = |i: usize| -> u64 { spec.split(',').nth(i).unwrap().parse().unwrap() };
    let (rank, ranks, steps, every) = (num(0) as usize, num(1) as usize, num(2), num(3));
    let dir = std::env::var("WGPU_EMA_RANK_DIR").unwrap();
    let ctx = GpuContext::new().expect("a rank needs an adapter");
    let mut part = Part::new(&ctx, RankPlan::even(&model(), rank, ranks).unwrap());
    let mut t = 0;
    while steps == 0 || t < steps {
        t += 1;
        part.step(&ctx, t);
        if t % every == 0 {
            part.save(Path::new(&dir), t);
            if rank == 0 {
                commit_ranks(&dir, t, ranks, Duration::from_secs(120)).unwrap();
                std::fs::write(Path::new(&dir).join("committed"), t.to_string()).unwrap();
            }
        }
    }
}

fn spawn(dir: &Path, rank: usize, ranks: usize, steps: u64, every: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["rank_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(
            "WGPU_EMA_RANK_CHILD",
            format!("{rank},{ranks},{steps},{every}"),
        )
        .env("WGPU_EMA_RANK_DIR", dir)
        // The test harness's lines of each child would bury the parent's.
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The whole model's EMA after each step, `steps` of them.
fn whole(ctx: &GpuContext, steps: u64) -> Vec<HostTensors> {
    let mut plan = RankPlan::new(0, 1).unwrap();
    for s in model() {
        plan = plan.whole(&s).unwrap();
    }
    let mut part = Part::new(ctx, plan);
    (1..=steps)
        .map(|t| {
            part.step(ctx, t);
            part.ema.read_shadows_blocking().unwrap()
        })
        .collect()
}

fn assert_save(ck: &RankedCheckpoint, want: &HostTensors, what: &str) {
    for s in model() {
        let got = ck
            .read(&format!("{}/ExponentialMovingAverage", s.name))
            .unwrap();
        assert_eq!(
            bits(&got),
            bits(want.try_get(&s.name).unwrap()),
            "{what}: {}",
            s.name
        );
    }
}

#[test]
fn ranks_in_processes_save_concurrently_and_reshard_bit_for_bit() {
    let Some(ctx) = gpu() else { return };
    let reference = whole(ctx, 6);
    for n in [1usize, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let children: Vec<Child> = (0..n).map(|r| spawn(dir.path(), r, n, 6, 3)).collect();
        for mut c in children {
            assert!(c.wait().unwrap().success(), "a rank of {n} failed");
        }
        let ck = RankedCheckpoint::open(dir.path()).unwrap();
        assert_eq!((ck.ranks(), ck.save()), (n, 6));
        assert_save(&ck, &reference[5], &format!("{n} processes"));
        for m in [1usize, 2, 4] {
            let out = tempfile::tempdir().unwrap();
            ck.reshard(out.path(), m).unwrap();
            let again = RankedCheckpoint::open(out.path()).unwrap();
            assert_save(
                &again,
                &reference[5],
                &format!("{n} processes into {m} ranks"),
            );
        }
    }
}

/// Ranks saving every step, one of them killed (SIGKILL) at a random moment: the folder always
/// opens at a whole committed save, equal to the whole model's EMA at that step.
#[test]
fn a_rank_killed_mid_save_leaves_the_last_committed_save_whole() {
    let Some(ctx) = gpu() else { return };
    let reference = whole(ctx, 400);
    let mut rng = fastrand::Rng::with_seed(11);
    for round in 0..6 {
        let dir = tempfile::tempdir().unwrap();
        let mut children: Vec<Child> = (0..2).map(|r| spawn(dir.path(), r, 2, 400, 1)).collect();
        // Wait for a first commit, then kill a rank a random moment later.
        let start = Instant::now();
        while !dir.path().join("committed").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no save committed"
            );
            if children.iter_mut().any(|c| c.try_wait().unwrap().is_some()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
        let victim = rng.usize(0..2);
        children[victim].kill().ok();
        children[victim].wait().unwrap();
        // The other rank waits for its partner's file at the next commit (or saves past it):
        // stop it too, then look at what is on disk.
        children[1 - victim].kill().ok();
        children[1 - victim].wait().unwrap();
        let ck = RankedCheckpoint::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: the folder does not open: {e}"));
        assert!(ck.save() >= 1);
        assert_save(
            &ck,
            &reference[ck.save() as usize - 1],
            &format!("round {round}, save {}", ck.save()),
        );
    }
}
