//! The LevelDB table format of TensorFlow's `.index` files (`tensorflow/core/lib/io/table*`),
//! written and read by hand: no maintained crate writes this exact format without a LevelDB
//! of its own (its keys sort bytewise, blocks are uncompressed, and the checksums are
//! LevelDB's masked CRC32C).
//!
//! File: data blocks, an empty metaindex block, an index block, a 48-byte footer. A block:
//! entries (`varint shared, varint unshared, varint value length, key suffix, value`), the
//! restart offsets (u32 LE) and their count, then a 5-byte trailer: compression type (0) and
//! the masked CRC32C of the block and that byte.

/// A key and its value.
pub(crate) type Pair = (Vec<u8>, Vec<u8>);

const MAGIC: u64 = 0xdb47_7524_8b80_fb57;
const FOOTER: usize = 48;
/// Data blocks close past this many bytes (LevelDB's default).
const BLOCK_SIZE: usize = 4096;
const RESTART_INTERVAL: usize = 16;

/// LevelDB's and TensorFlow's masked CRC32C.
pub(crate) fn mask(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

struct BlockBuilder {
    buf: Vec<u8>,
    restarts: Vec<u32>,
    interval: usize,
    count: usize,
    last: Vec<u8>,
}

impl BlockBuilder {
    fn new(interval: usize) -> Self {
        Self {
            buf: Vec::new(),
            restarts: vec![0],
            interval,
            count: 0,
            last: Vec::new(),
        }
    }

    fn add(&mut self, key: &[u8], value: &[u8]) {
        let mut shared = 0;
        if self.count < self.interval {
            shared = key
                .iter()
                .zip(&self.last)
                .take_while(|(a, b)| a == b)
                .count();
        } else {
            self.restarts.push(self.buf.len() as u32);
            self.count = 0;
        }
        put_varint(&mut self.buf, shared as u64);
        put_varint(&mut self.buf, (key.len() - shared) as u64);
        put_varint(&mut self.buf, value.len() as u64);
        self.buf.extend_from_slice(&key[shared..]);
        self.buf.extend_from_slice(value);
        self.last = key.to_vec();
        self.count += 1;
    }

    fn finish(mut self) -> Vec<u8> {
        for r in &self.restarts {
            self.buf.extend_from_slice(&r.to_le_bytes());
        }
        self.buf
            .extend_from_slice(&(self.restarts.len() as u32).to_le_bytes());
        self.buf
    }
}

/// Appends `block` and its trailer to `out`; returns its handle (offset, size).
fn emit(out: &mut Vec<u8>, block: &[u8]) -> (u64, u64) {
    let handle = (out.len() as u64, block.len() as u64);
    out.extend_from_slice(block);
    out.push(0);
    let crc = crc32c::crc32c_append(crc32c::crc32c(block), &[0]);
    out.extend_from_slice(&mask(crc).to_le_bytes());
    handle
}

fn put_handle(out: &mut Vec<u8>, (offset, size): (u64, u64)) {
    put_varint(out, offset);
    put_varint(out, size);
}

/// A whole table of `entries`, whose keys must be sorted bytewise and unique.
pub(crate) fn build(entries: &[Pair]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut index = BlockBuilder::new(1);
    let mut block = BlockBuilder::new(RESTART_INTERVAL);
    for (i, (k, v)) in entries.iter().enumerate() {
        block.add(k, v);
        if block.buf.len() >= BLOCK_SIZE || i + 1 == entries.len() {
            let full = std::mem::replace(&mut block, BlockBuilder::new(RESTART_INTERVAL));
            let handle = emit(&mut out, &full.finish());
            let mut h = Vec::new();
            put_handle(&mut h, handle);
            // The block's last key separates it from the next one.
            index.add(k, &h);
        }
    }
    finish(out, index)
}

/// Appends the empty metaindex block, the `index` block and the footer to `out`.
fn finish(mut out: Vec<u8>, index: BlockBuilder) -> Vec<u8> {
    let meta = emit(&mut out, &BlockBuilder::new(RESTART_INTERVAL).finish());
    let idx = emit(&mut out, &index.finish());
    let mut footer = Vec::with_capacity(FOOTER);
    put_handle(&mut footer, meta);
    put_handle(&mut footer, idx);
    footer.resize(FOOTER - 8, 0);
    footer.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&footer);
    out
}

/// A block's contents after checking its trailer (uncompressed, CRC).
fn block(file: &[u8], (offset, size): (u64, u64)) -> Result<&[u8], String> {
    let (o, s) = (usize::try_from(offset), usize::try_from(size));
    let (Ok(o), Ok(s)) = (o, s) else {
        return Err("a block handle past the file".into());
    };
    let end = o.checked_add(s).and_then(|e| e.checked_add(5));
    let Some(trailer) = end.and_then(|e| file.get(o + s..e)) else {
        return Err(format!("block at {offset} (+{size}) runs past the file"));
    };
    let contents = &file[o..o + s];
    if trailer[0] != 0 {
        return Err(format!(
            "block at {offset} is compressed (type {}); only uncompressed tables are read",
            trailer[0]
        ));
    }
    let want = u32::from_le_bytes([trailer[1], trailer[2], trailer[3], trailer[4]]);
    let got = mask(crc32c::crc32c_append(crc32c::crc32c(contents), &[0]));
    if got != want {
        return Err(format!("block at {offset}: checksum mismatch"));
    }
    Ok(contents)
}

/// Every (key, value) of a block, in order, each taken out of `budget` (bytes of keys and
/// values, plus [`PER_ENTRY`] each).
fn entries(block: &[u8], budget: &mut usize) -> Result<Vec<Pair>, String> {
    let bad = || "malformed block".to_string();
    if block.len() < 4 {
        return Err(bad());
    }
    let n = u32::from_le_bytes(block[block.len() - 4..].try_into().map_err(|_| bad())?) as usize;
    let restarts = n
        .checked_mul(4)
        .and_then(|b| b.checked_add(4))
        .ok_or_else(bad)?;
    let end = block.len().checked_sub(restarts).ok_or_else(bad)?;
    let mut out = Vec::new();
    let mut key: Vec<u8> = Vec::new();
    let mut at = 0;
    while at < end {
        let shared = get_varint(block, &mut at).ok_or_else(bad)? as usize;
        let unshared = get_varint(block, &mut at).ok_or_else(bad)? as usize;
        let vlen = get_varint(block, &mut at).ok_or_else(bad)? as usize;
        if shared > key.len() {
            return Err(bad());
        }
        let kend = at
            .checked_add(unshared)
            .filter(|&e| e <= end)
            .ok_or_else(bad)?;
        let vend = kend
            .checked_add(vlen)
            .filter(|&e| e <= end)
            .ok_or_else(bad)?;
        key.truncate(shared);
        key.extend_from_slice(&block[at..kend]);
        // Prefix compression lets a few bytes stand for a long key: what the entries expand
        // to is charged before it is allocated.
        *budget = budget
            .checked_sub(key.len() + vlen + PER_ENTRY)
            .ok_or_else(|| {
                format!("the table expands to more than {EXPANSION} times its size: not an index TensorFlow writes")
            })?;
        out.push((key.clone(), block[kend..vend].to_vec()));
        at = vend;
    }
    Ok(out)
}

/// How many times its own size a table may expand to (keys restored from their shared
/// prefixes, plus [`PER_ENTRY`] each): TensorFlow's indexes expand about twice; a crafted one
/// could otherwise expand quadratically.
const EXPANSION: usize = 8;
/// What each entry is charged beyond its bytes (two vectors' headers).
const PER_ENTRY: usize = 48;

/// Every (key, value) of a table, checking every block's checksum.
pub(crate) fn read(file: &[u8]) -> Result<Vec<Pair>, String> {
    if file.len() < FOOTER {
        return Err(format!("{} bytes: too short for a table", file.len()));
    }
    let footer = &file[file.len() - FOOTER..];
    if u64::from_le_bytes(footer[40..].try_into().map_err(|_| "footer")?) != MAGIC {
        return Err("not a TensorFlow index table (bad magic number)".into());
    }
    let mut at = 0;
    let handle = |at: &mut usize| -> Result<(u64, u64), String> {
        let o = get_varint(footer, at).ok_or("malformed footer")?;
        let s = get_varint(footer, at).ok_or("malformed footer")?;
        Ok((o, s))
    };
    let _meta = handle(&mut at)?;
    let index = handle(&mut at)?;
    let mut budget = file.len().saturating_mul(EXPANSION).saturating_add(1 << 16);
    let mut out: Vec<Pair> = Vec::new();
    for (_, h) in entries(block(file, index)?, &mut budget)? {
        let mut p = 0;
        let o = get_varint(&h, &mut p).ok_or("malformed block handle")?;
        let s = get_varint(&h, &mut p).ok_or("malformed block handle")?;
        for (k, v) in entries(block(file, (o, s))?, &mut budget)? {
            // A table's keys are strictly increasing (bytewise): a repeated key would let a
            // later entry silently replace an earlier one.
            if let Some((last, _)) = out.last() {
                if k == *last {
                    return Err(format!(
                        "key `{}` appears twice",
                        String::from_utf8_lossy(&k)
                    ));
                }
                if k < *last {
                    return Err(format!(
                        "keys out of order: `{}` after `{}`",
                        String::from_utf8_lossy(&k),
                        String::from_utf8_lossy(last)
                    ));
                }
            }
            out.push((k, v));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of one data block given as its bytes.
    fn build_raw(block: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut h = Vec::new();
        put_handle(&mut h, emit(&mut out, &block));
        let mut index = BlockBuilder::new(1);
        index.add(b"~", &h);
        finish(out, index)
    }

    #[test]
    fn tables_round_trip_across_blocks_and_catch_flips() {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..500)
            .map(|i| (format!("key/{i:05}").into_bytes(), vec![i as u8; i % 37]))
            .collect();
        let t = build(&entries);
        assert_eq!(read(&t).unwrap(), entries);
        let mut bad = t.clone();
        bad[100] ^= 1;
        assert!(read(&bad).is_err());
        assert_eq!(read(&build(&[])).unwrap(), vec![]);
        // What the builder is handed out of order, it writes out of order: the reader refuses.
        let swapped = [entries[1].clone(), entries[0].clone()];
        assert!(read(&build(&swapped)).unwrap_err().contains("out of order"));
        let twice = [entries[0].clone(), entries[0].clone()];
        assert!(read(&build(&twice)).unwrap_err().contains("twice"));
        assert_eq!(mask(0), 0xa282_ead8);
    }

    /// A block whose entries each share the whole previous key and add one byte: 4 bytes per
    /// entry in the file, keys growing by one each (quadratic if expanded freely).
    #[test]
    fn a_block_that_expands_quadratically_is_refused() {
        let mut b = BlockBuilder::new(usize::MAX);
        let mut key = Vec::new();
        for _ in 0..20_000 {
            key.push(b'k');
            b.add(&key, &[]);
        }
        let t = build_raw(b.finish());
        let err = read(&t).unwrap_err();
        assert!(err.contains("expands"), "{err}");
    }
}
