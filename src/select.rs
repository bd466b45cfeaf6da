//! Which tensors the EMA averages, which it copies, which it leaves out: chosen by name
//! patterns when an EMA is built.
//!
//! Real models hold tensors that must not be averaged: BatchNorm's running statistics are
//! copied (timm's `exclude_buffers`, torchtitan's `buffer_patterns`, Stable-Baselines3's
//! copy with tau = 1), some are left out entirely (ema-pytorch's `ignore_names`, optax's
//! `only=`), and fine-tuning often wants the EMA of the adapters alone. A [`Selection`] says
//! so with glob patterns over the tracked names (`*` any run of characters, `/` and `.`
//! included; `?` one character; `[ab]`; `{a,b}`), through `globset`: the patterns people
//! already write for module paths, compiled into one matcher.
//!
//! ```
//! use wgpu_ema::select::{Mode, Selection};
//! let sel = Selection::new().copy("*.running_*").exclude("*.num_batches_tracked");
//! let names = ["conv.weight", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"];
//! let modes = sel.resolve(names)?;
//! assert_eq!(modes, [Mode::Average, Mode::Copy, Mode::Copy, Mode::Exclude]);
//! // Only the adapters: everything else left out.
//! let lora = Selection::new().exclude("*").average("*.lora_*");
//! assert_eq!(
//!     lora.resolve(["base.weight", "attn.lora_a", "attn.lora_b"])?,
//!     [Mode::Exclude, Mode::Average, Mode::Average]
//! );
//! # Ok::<(), wgpu_ema::Error>(())
//! ```

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::error::{Error, Result};

/// What the EMA does with a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The moving average (the default).
    Average,
    /// The shadow takes the parameter's value exactly on every update (running statistics).
    Copy,
    /// Not tracked: no shadow, not in checkpoints.
    Exclude,
}

/// Name patterns choosing tensors to copy or to leave out; every other tensor is averaged.
///
/// Rules apply in order, the last matching rule deciding, so a broad rule can be narrowed
/// after it (`exclude("*")` then `average("*.lora_*")`). Errors when the selection is
/// applied: a pattern that matches no tensor (a typo would otherwise average what it meant to
/// copy), and a tensor matched by both a `copy` and an `exclude` rule (which one was meant?).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    rules: Vec<(Mode, String)>,
}

impl Selection {
    /// No rules: every tensor averaged.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tensors matching `pattern` are copied.
    pub fn copy(self, pattern: impl Into<String>) -> Self {
        self.rule(Mode::Copy, pattern)
    }

    /// Tensors matching `pattern` are left out.
    pub fn exclude(self, pattern: impl Into<String>) -> Self {
        self.rule(Mode::Exclude, pattern)
    }

    /// Tensors matching `pattern` are averaged (undoing an earlier, broader rule).
    pub fn average(self, pattern: impl Into<String>) -> Self {
        self.rule(Mode::Average, pattern)
    }

    fn rule(mut self, mode: Mode, pattern: impl Into<String>) -> Self {
        self.rules.push((mode, pattern.into()));
        self
    }

    /// True without rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The mode of each name, in order. Errors: a pattern that does not parse, or that
    /// matches none of `names`.
    pub fn resolve<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<Vec<Mode>> {
        let names: Vec<&str> = names.into_iter().collect();
        if self.rules.is_empty() {
            return Ok(vec![Mode::Average; names.len()]);
        }
        let mut set = GlobSetBuilder::new();
        for (_, pattern) in &self.rules {
            let glob = Glob::new(pattern)
                .map_err(|e| Error::InvalidConfig(format!("selection pattern `{pattern}`: {e}")))?;
            set.add(glob);
        }
        let set: GlobSet = set
            .build()
            .map_err(|e| Error::InvalidConfig(format!("selection patterns: {e}")))?;
        let mut used = vec![false; self.rules.len()];
        let mut modes = Vec::with_capacity(names.len());
        for name in &names {
            let hits = set.matches(name);
            for &r in &hits {
                used[r] = true;
            }
            let first = |mode| hits.iter().find(|&&r| self.rules[r].0 == mode);
            if let (Some(&c), Some(&x)) = (first(Mode::Copy), first(Mode::Exclude)) {
                return Err(Error::InvalidConfig(format!(
                    "tensor `{name}` is both copied (`{}`) and excluded (`{}`): say one",
                    self.rules[c].1, self.rules[x].1
                )));
            }
            // The last rule that matches decides.
            modes.push(
                hits.iter()
                    .max()
                    .map_or(Mode::Average, |&r| self.rules[r].0),
            );
        }
        if let Some(r) = used.iter().position(|u| !u) {
            return Err(Error::InvalidConfig(format!(
                "selection pattern `{}` ({:?}) matches none of the {} tracked tensors",
                self.rules[r].1,
                self.rules[r].0,
                names.len()
            )));
        }
        Ok(modes)
    }
}

/// The selection as checkpoints record it: the names copied and left out,
/// `copy=a,b;exclude=c` (each list sorted; empty when every tensor is averaged).
pub(crate) fn describe<'a>(named: impl IntoIterator<Item = (&'a str, Mode)>) -> String {
    let (mut copy, mut exclude) = (Vec::new(), Vec::new());
    for (name, mode) in named {
        match mode {
            Mode::Copy => copy.push(name),
            Mode::Exclude => exclude.push(name),
            Mode::Average => {}
        }
    }
    copy.sort_unstable();
    exclude.sort_unstable();
    let mut parts = Vec::new();
    if !copy.is_empty() {
        parts.push(format!("copy={}", copy.join(",")));
    }
    if !exclude.is_empty() {
        parts.push(format!("exclude={}", exclude.join(",")));
    }
    parts.join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_matching_rule_decides_and_unused_patterns_are_errors() {
        let names = ["a.w", "a.running_mean", "b.w", "b.lora_a"];
        let sel = Selection::new()
            .copy("*.running_*")
            .exclude("b.*")
            .average("*.lora_*");
        assert_eq!(
            sel.resolve(names).unwrap(),
            [Mode::Average, Mode::Copy, Mode::Exclude, Mode::Average]
        );
        let e = Selection::new()
            .copy("*.runing_*")
            .resolve(names)
            .unwrap_err();
        assert!(e.to_string().contains("runing"), "{e}");
        assert!(Selection::new().copy("[").resolve(names).is_err());
        let e = Selection::new()
            .copy("a.*")
            .exclude("*.w")
            .resolve(names)
            .unwrap_err();
        assert!(e.to_string().contains("`a.w` is both copied"), "{e}");
        assert_eq!(Selection::new().resolve(names).unwrap(), [Mode::Average; 4]);
        assert_eq!(
            describe(names.iter().copied().zip(sel.resolve(names).unwrap())),
            "copy=a.running_mean;exclude=b.w"
        );
        assert_eq!(describe([("x", Mode::Average)]), "");
    }
}
