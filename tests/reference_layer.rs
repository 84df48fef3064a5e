//! One SUPRA layer against the golden fixture of an independent PyTorch implementation written
//! from the reference code (scripts/reference/supra_layer_fixture.py): φ on queries and on keys
//! (GQA, 4 query heads over 2), RoPE after φ over a feature dim (6) that is not the head dim
//! (8), the Lightning decay, GroupNorm, Wo. Every form: training (f64 and f32, several chunk
//! sizes), inference prefill, and prefill continued one step at a time.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use supra::attention::feature_map::FeatureMap;
use supra::attention::supra::{Decay, HeadDecays, SupraAttention};
use supra::attention::{Exec, Projections};
use supra::model::linear::Linear;
use supra::model::rope::Rope;

fn fixture() -> Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/supra_layer.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn dim(f: &Value, name: &str) -> usize {
    f["dims"][name].as_u64().unwrap() as usize
}

fn layer(f: &Value, dtype: DType, chunk: usize) -> SupraAttention {
    let t = |name: &str| {
        let p = &f["params"][name];
        let shape: Vec<usize> = p["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        Tensor::from_vec(floats(&p["data"]), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let lin = |name: &str, bias: bool| {
        Linear::new(
            t(&format!("{name}.weight")),
            bias.then(|| t(&format!("{name}.bias"))),
        )
    };
    let h = dim(f, "heads");
    let gammas = Decay::Lightning.gammas(h).unwrap();
    // The decays are the reference's exp(−slope), not only ours.
    for (g, want) in gammas.iter().zip(floats(&f["gammas"])) {
        assert!(
            (g - want).abs() < 1e-12,
            "decay {g} vs the reference's {want}"
        );
    }
    SupraAttention {
        proj: Projections {
            q: lin("q_proj", false),
            k: lin("k_proj", false),
            v: lin("v_proj", false),
            o: lin("o_proj", false),
            n_heads: h,
            n_kv_heads: dim(f, "kv_heads"),
            head_dim: dim(f, "head_dim"),
        },
        phi: FeatureMap::Relu {
            q: lin("phi_q", true),
            k: Some(lin("phi_k", true)),
        },
        feature_dim: dim(f, "feature_dim"),
        gammas: HeadDecays::Fixed(gammas),
        chunk_size: chunk,
        rope: Rope::new(
            dim(f, "feature_dim"),
            f["dims"]["rope_theta"].as_f64().unwrap(),
            64,
            &Device::Cpu,
        )
        .unwrap(),
    }
}

fn max_rel(got: &Tensor, want: &[f64]) -> f64 {
    let got: Vec<f64> = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0.0, f64::max)
}

#[test]
fn one_layer_matches_the_pytorch_reference_in_every_form() {
    let f = fixture();
    let (b, t, hidden) = (dim(&f, "batch"), dim(&f, "seq"), dim(&f, "hidden"));
    let x = Tensor::from_vec(floats(&f["x"]), (b, t, hidden), &Device::Cpu).unwrap();
    let (want_y, want_heads, want_state) =
        (floats(&f["y"]), floats(&f["heads"]), floats(&f["state"]));

    // The training form in f64: the same function, to the rounding of RoPE's tables (f32
    // angles, as transformers computes them; 5e-8 here).
    for chunk in [1, 4, 64] {
        let l = layer(&f, DType::F64, chunk);
        let y = l.forward(&x, 0, None, Exec::Train).unwrap();
        let e = max_rel(&y, &want_y);
        assert!(e < 1e-6, "f64 training form, chunk {chunk}: {e}");
        let mut state = None;
        let heads = l
            .heads_output(&x, 0, Some(&mut state), Exec::Train)
            .unwrap();
        assert!(max_rel(&heads, &want_heads) < 1e-6, "per-head outputs");
        assert!(
            max_rel(&state.unwrap().to_tensor().unwrap(), &want_state) < 1e-6,
            "final state"
        );
    }
    // f32: the training form and the inference prefill.
    let x32 = x.to_dtype(DType::F32).unwrap();
    for exec in [Exec::Train, Exec::Infer] {
        let l = layer(&f, DType::F32, 4);
        let y = l.forward(&x32, 0, None, exec).unwrap();
        let e = max_rel(&y, &want_y);
        assert!(e < 1e-5, "{exec:?}: {e}");
    }
    // Each sequence alone: a prefill of 5 tokens, then one step at a time.
    let l = layer(&f, DType::F32, 4);
    let per_seq = want_y.len() / b;
    for s in 0..b {
        let xs = x32.narrow(0, s, 1).unwrap();
        let mut state = None;
        let mut outs = vec![l
            .forward(
                &xs.narrow(1, 0, 5).unwrap(),
                0,
                Some(&mut state),
                Exec::Infer,
            )
            .unwrap()];
        for i in 5..t {
            let xi = xs.narrow(1, i, 1).unwrap();
            outs.push(l.forward(&xi, i, Some(&mut state), Exec::Infer).unwrap());
        }
        let y = Tensor::cat(&outs, 1).unwrap();
        let e = max_rel(&y, &want_y[s * per_seq..(s + 1) * per_seq]);
        assert!(e < 1e-5, "sequence {s}, prefill + steps: {e}");
    }
}
