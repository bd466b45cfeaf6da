//! `Checkpoint::load` on arbitrary bytes, as a single file and as a sharded index beside two
//! shards: it must return a checkpoint or an error, never panic, hang or run out of memory.
//! `cargo +nightly fuzz run load -- -max_total_time=60` (README, "Reliability").
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgpu_ema::checkpoint::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile_dir() else { return };
    // The first byte picks what the rest is: a safetensors file, or an index whose shards are
    // the rest split in two.
    let (kind, rest) = data.split_first().unwrap_or((&0, data));
    let result = if kind % 2 == 0 {
        let path = dir.join("f.safetensors");
        let _ = std::fs::write(&path, rest);
        Checkpoint::load(&path)
    } else {
        let (a, b) = rest.split_at(rest.len() / 2);
        let _ = std::fs::write(dir.join("a.safetensors"), a);
        let _ = std::fs::write(dir.join("b.safetensors"), b);
        let index = dir.join("model.safetensors.index.json");
        let json = format!(
            r#"{{"metadata": {{}}, "weight_map": {{"x": "a.safetensors", "y": "b.safetensors", "z": "{}"}}}}"#,
            String::from_utf8_lossy(&rest[..rest.len().min(8)]).replace(['"', '\\'], "")
        );
        let _ = std::fs::write(&index, json);
        Checkpoint::load(&index)
    };
    if let Ok(c) = result {
        for name in c.names() {
            let _ = c.get(name);
        }
        let _ = c.num_updates();
    }
    let _ = std::fs::remove_dir_all(&dir);
});

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wgpu-ema-fuzz-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
