//! Parameter lists of real models, shared by the benches.

use wgpu_ema::TensorSpec;

/// ResNet-50's 161 parameter tensors (torchvision layout): 25,557,032 parameters.
pub fn resnet50() -> Vec<TensorSpec> {
    let mut v = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| v.push(TensorSpec::new(name, shape));
    add("conv1.weight".into(), vec![64, 3, 7, 7]);
    add("bn1.weight".into(), vec![64]);
    add("bn1.bias".into(), vec![64]);
    let mut inp = 64;
    for (li, (blocks, width)) in [(3, 64), (4, 128), (6, 256), (3, 512)]
        .into_iter()
        .enumerate()
    {
        for b in 0..blocks {
            let p = format!("layer{}.{b}", li + 1);
            for (ci, (cin, cout, k)) in [(inp, width, 1), (width, width, 3), (width, 4 * width, 1)]
                .into_iter()
                .enumerate()
            {
                add(format!("{p}.conv{}.weight", ci + 1), vec![cout, cin, k, k]);
                add(format!("{p}.bn{}.weight", ci + 1), vec![cout]);
                add(format!("{p}.bn{}.bias", ci + 1), vec![cout]);
            }
            if b == 0 {
                add(
                    format!("{p}.downsample.0.weight"),
                    vec![4 * width, inp, 1, 1],
                );
                add(format!("{p}.downsample.1.weight"), vec![4 * width]);
                add(format!("{p}.downsample.1.bias"), vec![4 * width]);
            }
            inp = 4 * width;
        }
    }
    add("fc.weight".into(), vec![1000, 2048]);
    add("fc.bias".into(), vec![1000]);
    v
}

/// GPT-2 small's 148 parameter tensors (Hugging Face layout): 124,439,808 parameters.
pub fn gpt2_small() -> Vec<TensorSpec> {
    let mut v = vec![
        TensorSpec::new("wte", [50257, 768]),
        TensorSpec::new("wpe", [1024, 768]),
    ];
    for l in 0..12 {
        for (n, s) in [
            ("ln_1.weight", vec![768]),
            ("ln_1.bias", vec![768]),
            ("attn.c_attn.weight", vec![768, 2304]),
            ("attn.c_attn.bias", vec![2304]),
            ("attn.c_proj.weight", vec![768, 768]),
            ("attn.c_proj.bias", vec![768]),
            ("ln_2.weight", vec![768]),
            ("ln_2.bias", vec![768]),
            ("mlp.c_fc.weight", vec![768, 3072]),
            ("mlp.c_fc.bias", vec![3072]),
            ("mlp.c_proj.weight", vec![3072, 768]),
            ("mlp.c_proj.bias", vec![768]),
        ] {
            v.push(TensorSpec::new(format!("h.{l}.{n}"), s));
        }
    }
    v.push(TensorSpec::new("ln_f.weight", [768]));
    v.push(TensorSpec::new("ln_f.bias", [768]));
    v
}
