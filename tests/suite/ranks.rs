//! An EMA spread over ranks, in one process: each rank's EMA over its part of a global model,
//! against one EMA of the whole (the same arithmetic per element: bit for bit); rank files,
//! the committing index, consolidation, resharding N ranks into M, and the sets refused.

use std::path::Path;
use std::time::Duration;

use crate::common::{bits, gpu, random};
use wgpu_ema::checkpoint::ranks::{
    commit_ranks, save_rank, RankPlan, RankedCheckpoint, RANKS_INDEX,
};
use wgpu_ema::checkpoint::Checkpoint;
use wgpu_ema::{
    CheckpointErrorKind, Error, GpuContext, GpuEma, HostTensors, ParamArena, Schedule, TensorSpec,
};

fn model() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("layer.weight", [37, 5]),
        TensorSpec::new("layer.bias", [37]),
        TensorSpec::new("scale", []),
    ]
}

/// Global tensor `g`'s values at step `t`.
fn global_values(g: usize, t: u64) -> Vec<f32> {
    random(t * 10 + g as u64, model()[g].numel() as usize)
}

fn schedule() -> Schedule {
    Schedule::tf(0.99)
}

/// An EMA over `specs` (global tensors, or a plan's local ones) fed, for `steps` steps, the
/// global values restricted to `range_of(spec)`.
fn run(
    ctx: &GpuContext,
    specs: &[TensorSpec],
    range_of: impl Fn(&TensorSpec) -> (usize, u64, u64),
    steps: u64,
) -> (ParamArena, GpuEma) {
    let arena = ParamArena::new(&ctx.device, specs.iter().cloned()).unwrap();
    let write = |t: u64| {
        for s in specs {
            let (g, start, len) = range_of(s);
            let v = global_values(g, t);
            arena
                .write(
                    &ctx.queue,
                    &s.name,
                    &v[start as usize..(start + len) as usize],
                )
                .unwrap();
        }
    };
    write(0);
    let mut ema = GpuEma::builder(schedule())
        .extra_ema(Schedule::constant(0.9))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    for t in 1..=steps {
        write(t);
        ema.update().unwrap();
    }
    (arena, ema)
}

fn whole(ctx: &GpuContext, steps: u64) -> GpuEma {
    let specs = model();
    run(ctx, &specs, |s| (index(&s.name), 0, s.numel()), steps).1
}

fn index(name: &str) -> usize {
    model().iter().position(|g| g.name == name).unwrap()
}

/// Rank `plan`'s EMA after `steps` steps.
fn rank(ctx: &GpuContext, plan: &RankPlan, steps: u64) -> GpuEma {
    let range = |s: &TensorSpec| {
        let p = plan.pieces().iter().find(|p| p.global == s.name).unwrap();
        (index(&p.global), p.start, p.len)
    };
    run(ctx, &plan.local_specs(), range, steps).1
}

/// Saves save `steps` of `ranks` ranks into `dir` (each rank's momentum too) and commits it.
fn save_all(ctx: &GpuContext, dir: &Path, ranks: usize, steps: u64) {
    for r in 0..ranks {
        let plan = RankPlan::even(&model(), r, ranks).unwrap();
        let ema = rank(ctx, &plan, steps);
        let mut momentum = HostTensors::new();
        for s in plan.local_specs() {
            let v = vec![r as f32; s.numel() as usize];
            momentum
                .insert(TensorSpec::new(format!("{}/Momentum", s.name), &s.shape), v)
                .unwrap();
        }
        save_rank(
            dir,
            &ema.snapshot(true).unwrap(),
            None,
            &momentum,
            &plan,
            steps,
        )
        .unwrap();
    }
    commit_ranks(dir, steps, ranks, Duration::from_secs(5)).unwrap();
}

/// The global shadows of both EMAs in `ck`, against the whole model's EMA.
fn assert_matches(ck: &RankedCheckpoint, reference: &GpuEma, what: &str) {
    for (k, name) in [
        (0, "ExponentialMovingAverage"),
        (1, "ExponentialMovingAverage_1"),
    ] {
        let want = reference.read_ema_blocking(k).unwrap();
        for g in model() {
            let got = ck.read(&format!("{}/{name}", g.name)).unwrap();
            assert_eq!(
                bits(&got),
                bits(want.try_get(&g.name).unwrap()),
                "{what}: EMA {k} of {}",
                g.name
            );
        }
    }
}

#[test]
fn ranks_save_consolidate_and_reshard_bit_for_bit() {
    let Some(ctx) = gpu() else { return };
    let steps = 6;
    let reference = whole(ctx, steps);
    for n in [1usize, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        save_all(ctx, dir.path(), n, steps);
        let ck = RankedCheckpoint::open(dir.path()).unwrap();
        assert_eq!((ck.ranks(), ck.save()), (n, steps));
        // The index lists each file's pieces: each global tensor's ranges, in rank order.
        let listed: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(RANKS_INDEX)).unwrap())
                .unwrap();
        assert_eq!(listed["pieces"].as_array().unwrap().len(), n);
        assert_eq!(listed["pieces"][0][0]["global"], "layer.weight");
        assert_eq!(ck.pieces_of(0).unwrap()[0].start, 0);
        assert_eq!(
            ck.metadata().get("num_updates").map(String::as_str),
            Some("6")
        );
        assert_matches(&ck, &reference, &format!("{n} ranks"));
        // The raw parameters and each rank's extra tensors come back as global tensors too.
        let w = ck.read("layer.weight").unwrap();
        assert_eq!(w, global_values(0, steps));
        let m = ck.read("layer.bias/Momentum").unwrap();
        assert_eq!(m.len(), 37);

        // Consolidated: one file a single process restores, bit for bit.
        let file = dir.path().join("whole.safetensors");
        ck.consolidate(&file).unwrap();
        let (_arena, mut one) = run(ctx, &model(), |s| (index(&s.name), 0, s.numel()), 0);
        one.restore(&Checkpoint::load(&file).unwrap()).unwrap();
        assert_eq!(one.num_updates(), steps);
        for g in model() {
            assert_eq!(
                bits(
                    one.read_shadows_blocking()
                        .unwrap()
                        .try_get(&g.name)
                        .unwrap()
                ),
                bits(
                    reference
                        .read_shadows_blocking()
                        .unwrap()
                        .try_get(&g.name)
                        .unwrap()
                ),
            );
        }

        // Resharded into M ranks; each rank of M restores its part.
        for m in [1usize, 2, 4] {
            let out = tempfile::tempdir().unwrap();
            ck.reshard(out.path(), m).unwrap();
            let again = RankedCheckpoint::open(out.path()).unwrap();
            assert_eq!(again.ranks(), m);
            assert_matches(&again, &reference, &format!("{n} into {m} ranks"));
            for r in 0..m {
                let plan = RankPlan::even(&model(), r, m).unwrap();
                let mut ema = rank(ctx, &plan, 0);
                ema.restore(&ck.part(&plan).unwrap()).unwrap();
                let shadows = ema.read_shadows_blocking().unwrap();
                for p in plan.pieces() {
                    let want = reference.read_shadows_blocking().unwrap();
                    let want = &want.try_get(&p.global).unwrap()
                        [p.start as usize..(p.start + p.len) as usize];
                    assert_eq!(bits(shadows.try_get(&p.global).unwrap()), bits(want));
                }
            }
        }
    }
}

fn kind(e: &Error) -> Option<CheckpointErrorKind> {
    match e {
        Error::Checkpoint { kind, .. } => Some(*kind),
        _ => None,
    }
}

#[test]
fn a_missing_rank_leaves_the_last_save_and_bad_sets_name_their_file() {
    let Some(ctx) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    save_all(ctx, dir.path(), 3, 4);
    // Save 5: rank 2 dies before its file exists. Nothing is committed; save 4 stays whole.
    for r in 0..2 {
        let plan = RankPlan::even(&model(), r, 3).unwrap();
        let ema = rank(ctx, &plan, 5);
        save_rank(
            dir.path(),
            &ema.snapshot(true).unwrap(),
            None,
            &HostTensors::new(),
            &plan,
            5,
        )
        .unwrap();
    }
    let e = commit_ranks(dir.path(), 5, 3, Duration::from_millis(100)).unwrap_err();
    assert_eq!(kind(&e), Some(CheckpointErrorKind::Inconsistent), "{e}");
    assert!(e.to_string().contains("rank00002"), "{e}");
    let ck = RankedCheckpoint::open(dir.path()).unwrap();
    assert_eq!(ck.save(), 4);
    assert_matches(&ck, &whole(ctx, 4), "the last committed save");
    // The next whole save commits and removes the older files.
    save_all(ctx, dir.path(), 3, 6);
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(
        left.iter().all(|n| n.contains("00000000000000000006")),
        "{left:?}"
    );
    // An older save is not committed over a newer one.
    assert!(commit_ranks(dir.path(), 4, 3, Duration::ZERO).is_err());

    // A rank file of another save put in place of one of this save's: refused, naming it.
    let bad = tempfile::tempdir().unwrap();
    save_all(ctx, bad.path(), 2, 3);
    let other = tempfile::tempdir().unwrap();
    save_all(ctx, other.path(), 2, 7);
    let name = |save: u64, r: usize| format!("ema-{save:020}-rank{r:05}-of-00002.safetensors");
    std::fs::copy(other.path().join(name(7, 1)), bad.path().join(name(3, 1))).unwrap();
    let e = RankedCheckpoint::open(bad.path()).unwrap_err();
    assert_eq!(kind(&e), Some(CheckpointErrorKind::Inconsistent), "{e}");
    assert!(e.to_string().contains(&name(3, 1)), "{e}");

    // An index whose rank count does not match its files.
    let index = bad.path().join(RANKS_INDEX);
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, text.replace("\"ranks\": 2", "\"ranks\": 3")).unwrap();
    assert!(RankedCheckpoint::open(bad.path()).is_err());

    // Overlapping and missing ranges across ranks: refused at the commit, naming the file.
    for (second, what) in [((30u64, 155u64), "overlaps"), ((40, 145), "gap")] {
        let d = tempfile::tempdir().unwrap();
        let g = &model()[0];
        let plans = [
            RankPlan::new(0, 2)
                .unwrap()
                .piece(&g.name, &g.shape, 0, 35)
                .unwrap(),
            RankPlan::new(1, 2)
                .unwrap()
                .piece(&g.name, &g.shape, second.0, second.1)
                .unwrap(),
        ];
        for plan in &plans {
            let range = |s: &TensorSpec| {
                let p = plan.pieces().iter().find(|p| p.global == s.name).unwrap();
                (0, p.start, p.len)
            };
            let (_a, ema) = run(ctx, &plan.local_specs(), range, 1);
            save_rank(
                d.path(),
                &ema.snapshot(true).unwrap(),
                None,
                &HostTensors::new(),
                plan,
                1,
            )
            .unwrap();
        }
        let e = commit_ranks(d.path(), 1, 2, Duration::ZERO).unwrap_err();
        assert_eq!(kind(&e), Some(CheckpointErrorKind::Inconsistent), "{e}");
        assert!(
            e.to_string().contains("rank00001") || e.to_string().contains("elements"),
            "{what}: {e}"
        );
    }

    // A state that does not track its plan's tensors is refused before writing.
    let plan = RankPlan::even(&model(), 0, 2).unwrap();
    let ema = whole(ctx, 1);
    assert!(save_rank(
        dir.path(),
        &ema.snapshot(true).unwrap(),
        None,
        &HostTensors::new(),
        &plan,
        9
    )
    .is_err());
}

/// What would overwrite a committed save or cannot be a save is refused; ranks with their own
/// selections commit together, the consolidated file carrying their union and each part its
/// own.
#[test]
fn committed_saves_are_not_overwritten_and_selections_are_per_rank() {
    let Some(ctx) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    save_all(ctx, dir.path(), 2, 3);
    let plan = RankPlan::even(&model(), 0, 2).unwrap();
    let ema = rank(ctx, &plan, 3);
    let snap = ema.snapshot(true).unwrap();
    for save in [2, 3] {
        let e = save_rank(dir.path(), &snap, None, &HostTensors::new(), &plan, save).unwrap_err();
        assert_eq!(kind(&e), Some(CheckpointErrorKind::Refused), "{e}");
    }
    // An extra tensor of another size than its piece.
    let mut extra = HostTensors::new();
    extra
        .insert(TensorSpec::new("layer.bias/Momentum", [37]), vec![0.0; 37])
        .unwrap();
    assert!(save_rank(dir.path(), &snap, None, &extra, &plan, 4).is_err());
    let ck = RankedCheckpoint::open(dir.path()).unwrap();
    assert!(
        ck.reshard(dir.path(), 3).is_err(),
        "into the folder it reads"
    );
    assert!(ck.reshard(tempfile::tempdir().unwrap().path(), 0).is_err());
    assert!(commit_ranks(dir.path(), 9, 0, Duration::ZERO).is_err());
    assert!(ck.read_range("layer.bias", 30, u64::MAX).is_err());
    assert!(ck.read_range("layer.bias", 30, 8).is_err());
    assert_eq!(ck.read_range("layer.bias", 30, 7).unwrap().len(), 7);

    // Rank 0 copies `scale` (only it holds it); rank 1 has no selection.
    let sel = tempfile::tempdir().unwrap();
    for r in 0..2 {
        let plan = RankPlan::even(&model(), r, 2).unwrap();
        let arena = ParamArena::new(&ctx.device, plan.local_specs()).unwrap();
        let mut b = GpuEma::builder(schedule()).track_arena(&arena);
        if r == 0 {
            b = b.select(wgpu_ema::select::Selection::new().copy("scale"));
        }
        let ema = b.build(&ctx.device, &ctx.queue).unwrap();
        save_rank(
            sel.path(),
            &ema.snapshot(true).unwrap(),
            None,
            &HostTensors::new(),
            &plan,
            1,
        )
        .unwrap();
    }
    commit_ranks(sel.path(), 1, 2, Duration::ZERO).unwrap();
    let ck = RankedCheckpoint::open(sel.path()).unwrap();
    assert_eq!(
        ck.metadata().get("selection"),
        None,
        "kept apart from the shared metadata"
    );
    let file = sel.path().join("all.safetensors");
    ck.consolidate(&file).unwrap();
    let whole = Checkpoint::load(&file).unwrap();
    assert_eq!(
        whole.metadata().get("selection").map(String::as_str),
        Some("copy=scale")
    );
    let one = ck.part(&RankPlan::even(&model(), 1, 2).unwrap()).unwrap();
    assert_eq!(one.metadata().get("selection"), None);
}
