use super::*;
use crate::attention::Cell;
use crate::config::{Decay, LinearRule, SinkPositions};
use crate::model::linear::Linear;
use crate::testing::{check_grad, flat_f64 as flat, rel_err};
use candle_core::{Device, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::cell::RefCell;

thread_local! {
    /// The random values of these tests, from a fixed seed (per thread) so that a failing
    /// finite-difference check fails every time.
    static RNG: RefCell<StdRng> = RefCell::new(StdRng::seed_from_u64(0));
}

/// N(0, std²) values of `shape` in f64 (Box–Muller), from the tests' seeded generator.
fn randn(shape: &[usize], std: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n)
            .map(|_| {
                let (u, w): (f64, f64) = (r.random_range(f64::EPSILON..1.0), r.random());
                std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * w).cos()
            })
            .collect()
    });
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

const W: usize = 8;
const S: usize = 3;
const SPAN: Span = Span::absolute(W, S);

fn dims(heads: usize, kv_heads: usize, len: usize) -> Dims {
    Dims {
        batch: 2,
        heads,
        kv_heads,
        len,
        feature_dim: 6,
        value_dim: 8,
    }
}

/// Random q, k, v (B, ·, T, d) and non-negative φq, φk (B, ·, T, d'), in f64.
fn inputs(d: Dims) -> [Tensor; 5] {
    let dev = Device::Cpu;
    let n = |heads: usize, c: usize| {
        Tensor::randn(0f64, 1.0, (d.batch, heads, d.len, c), &dev).unwrap()
    };
    let (h, hkv, dv, f) = (d.heads, d.kv_heads, d.value_dim, d.feature_dim);
    [
        n(h, dv),
        n(hkv, dv),
        n(hkv, dv),
        n(h, f).relu().unwrap(),
        n(hkv, f).relu().unwrap(),
    ]
}

/// The mix weights under test: random shares in (0, 1), the window alone (0) and, over no
/// span, the linear branch alone (1).
fn settings(h: usize) -> Vec<(Vec<f64>, Span, &'static str)> {
    let random: Vec<f64> = (0..h).map(|i| 0.1 + 0.8 * i as f64 / h as f64).collect();
    vec![
        (random.clone(), SPAN, "both"),
        (vec![0.0; h], SPAN, "window only"),
        (vec![1.0; h], Span::absolute(0, 0), "linear only"),
        (random, CACHE, "both, q̃ for the sinks"),
        (vec![0.0; h], CACHE, "window only, q̃ for the sinks"),
    ]
}

/// The ways a layer combines its branches: both mixes with the additive state, the gated and
/// the value mix with the delta rule's.
const LINEARS: [(Mix, LinearRule); 4] = [
    (Mix::Shared, LinearRule::Add),
    (Mix::Gated, LinearRule::Add),
    (Mix::Gated, LinearRule::Delta),
    (Mix::Value, LinearRule::Delta),
];

/// [`SPAN`] with the sinks at their cache positions: the forms read q̃ for them.
const CACHE: Span = Span {
    sink_positions: SinkPositions::Cache,
    ..SPAN
};

/// The training form and the slice forms (one prefill; a prefill split into pieces and single
/// steps, state carried across) against the definition: lengths around the window, chunks
/// below and above it, GQA 9/3 and none, both mixes, both branches alone.
#[test]
fn forms_agree_with_the_definition() {
    let f32s = |x: &Tensor| -> Vec<f32> {
        x.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for (h, hkv) in [(9, 3), (4, 4)] {
        let gammas = Decay::Lightning.gammas(h).unwrap();
        for t in [1, W - 1, W, W + 1, 3 * W + 5, 300] {
            let d = dims(h, hkv, t);
            let [q, k, v, fq, fk] = inputs(d);
            let (qf, kf, vf, fqf, fkf) = (flat(&q), flat(&k), flat(&v), flat(&fq), flat(&fk));
            // The sinks' queries at cache positions: q turned back (rows past s + w − 1).
            let backs: Vec<usize> = (0..t).map(|n| n - CACHE.sink_query_position(n)).collect();
            let turn = crate::model::rope::Rope::new(8, 10_000.0, 512, &Device::Cpu)
                .and_then(|r| r.turning_back(&backs))
                .unwrap();
            let qs = turn.apply(&q).unwrap();
            let qsf = flat(&qs);
            let params = randn(&[h, 7], 1.0);
            let pf = flat(&params);
            for (mix, rule) in LINEARS {
                let delta = (rule == LinearRule::Delta).then_some(&params);
                for (weights, span, what) in settings(h) {
                    let cache = span.sink_positions == SinkPositions::Cache;
                    let x = naive::Inputs {
                        q: &qf,
                        qs: if cache { &qsf } else { &qf },
                        k: &kf,
                        v: &vf,
                        fq: &fqf,
                        fk: &fkf,
                        gammas: &gammas,
                        weights: &weights,
                        delta: delta.map(|_| &pf[..]),
                    };
                    let want = naive::naive(&x, span, mix, d);
                    let label = format!("H={h}/{hkv} T={t} {mix:?} {rule:?} {what}");
                    let wt = Tensor::from_vec(weights.clone(), (1, h, 1, 1), &Device::Cpu).unwrap();
                    let decays = HeadDecays::Fixed(gammas.clone());
                    for c in [5, 16, usize::MAX] {
                        let got = chunk::chunked(
                            ((&q, &k, &v), cache.then_some(&turn)),
                            (&fq, &fk),
                            (&wt, delta),
                            &decays,
                            span,
                            mix,
                            c,
                        )
                        .unwrap();
                        let e = rel_err(&flat(&got), &want);
                        assert!(e < 1e-10, "{label} training C={c}: {e}");
                    }
                    let w32: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
                    let p32: Vec<f32> = pf.iter().map(|&w| w as f32).collect();
                    // Prefill in pieces: all at once, and a third, then a piece, then steps.
                    let cuts: Vec<Vec<usize>> = vec![
                        vec![0, t],
                        [0, t / 3, 2 * t / 3]
                            .into_iter()
                            .chain(2 * t / 3 + 1..=t)
                            .collect(),
                    ];
                    for cut in cuts {
                        let sd = StateDims {
                            heads: h,
                            kv_heads: hkv,
                            head_dim: 8,
                            feature_dim: 6,
                            span,
                            rule,
                        };
                        let mut state = WindowState::empty(2, sd);
                        let mut pieces: Vec<Vec<f32>> = Vec::new();
                        for piece in cut.windows(2).filter(|p| p[1] > p[0]) {
                            let (a, n) = (piece[0], piece[1] - piece[0]);
                            let part = |x: &Tensor| f32s(&x.narrow(2, a, n).unwrap());
                            let (pq, pk, pv, pfq, pfk) =
                                (part(&q), part(&k), part(&v), part(&fq), part(&fk));
                            let pqs = part(&qs);
                            let xs = scan::Inputs {
                                q: &pq,
                                qs: cache.then_some(&pqs[..]),
                                k: &pk,
                                v: &pv,
                                fq: &pfq,
                                fk: &pfk,
                                delta: delta.map(|_| &p32[..]),
                            };
                            let dp = Dims { len: n, ..d };
                            pieces.push(scan::prefill(&xs, &mut state, &gammas, &w32, mix, 4, dp));
                        }
                        // Reassemble (B, H, T, d) from the pieces' (B, H, n, d).
                        let mut got = vec![0f64; want.len()];
                        let mut at = 0;
                        for p in &pieces {
                            let n = p.len() / (2 * h * 8);
                            for bh in 0..2 * h {
                                for i in 0..n * 8 {
                                    got[bh * t * 8 + at * 8 + i] = p[bh * n * 8 + i] as f64;
                                }
                            }
                            at += n;
                        }
                        let e = rel_err(&got, &want);
                        assert!(e < 1e-5, "{label} slices in {} pieces: {e}", pieces.len());
                        assert_eq!(state.len, t);
                    }
                }
            }
        }
    }
}

/// The value mix's point: a key that left the window, asked for with its own direction at
/// any scale, answers with the last value written under it, as it is (one-hot key features of
/// random size, β → 1, no decay, the gate fully open). The gated mix GroupNorms the same
/// answer, so it cannot.
#[test]
fn the_value_mix_recalls_a_value_as_it_was_written() {
    let (f, t, span) = (6, 14, Span::absolute(2, 0));
    let d = Dims {
        batch: 1,
        heads: 1,
        kv_heads: 1,
        len: t,
        feature_dim: f,
        value_dim: 8,
    };
    let [q, k, v, _, _] = inputs(d);
    // Values far from zero mean and unit variance, which GroupNorm would bring them to.
    let v = v.affine(3.0, 2.0).unwrap();
    // Key m has feature m mod f; the last query reads keys 0..=11, so feature j last held 6 + j.
    let one_hot = |scale: &dyn Fn(usize) -> f64, feature: &dyn Fn(usize) -> usize| {
        let rows: Vec<f64> = (0..t)
            .flat_map(|n| (0..f).map(move |i| if i == feature(n) { scale(n) } else { 0.0 }))
            .collect();
        Tensor::from_vec(rows, (1, 1, t, f), &Device::Cpu).unwrap()
    };
    let fk = one_hot(&|n| 0.5 + n as f64, &|n| n % f);
    let params = Tensor::from_vec(
        [vec![0.0; f], vec![40.0]].concat(),
        (1, f + 1),
        &Device::Cpu,
    )
    .unwrap();
    let (gate, decays) = (
        Tensor::ones((1, 1, 1, 1), DType::F64, &Device::Cpu).unwrap(),
        HeadDecays::Fixed(vec![1.0]),
    );
    let vf = flat(&v);
    for j in 0..f {
        let fq = one_hot(&|_| 3.7, &|_| j);
        let y = |mix| {
            let y = chunk::chunked(
                ((&q, &k, &v), None),
                (&fq, &fk),
                (&gate, Some(&params)),
                &decays,
                span,
                mix,
                4,
            )
            .unwrap();
            flat(&y)[(t - 1) * 8..].to_vec()
        };
        let want = &vf[(6 + j) * 8..][..8];
        assert!(rel_err(&y(Mix::Value), want) < 1e-9, "feature {j}");
        assert!(rel_err(&y(Mix::Gated), want) > 0.1, "feature {j}, gated");
    }
}

/// The span's bookkeeping: every earlier token is reached exactly once, exactly or linearly,
/// and a state keeps what the next token needs and no more.
#[test]
fn every_token_is_read_once() {
    for span in [SPAN, Span::absolute(1, 0), Span::absolute(0, 0)] {
        for n in 0..40 {
            for m in 0..=n {
                assert!(span.exact(n, m) ^ span.linear(n, m), "{span:?} n={n} m={m}");
            }
            assert!(!span.exact(n, n + 1) && !span.linear(n, n + 1));
            let kept = span.kept(n);
            assert!(kept.len() <= span.sinks + span.window);
            // The next query (n) reads exactly the kept ones that are exact for it, plus itself,
            // and takes the one at n − w into its state.
            for m in 0..n {
                let needed = span.exact(n, m) || (span.linear(n, m) && m + span.window == n);
                assert_eq!(kept.contains(&m), needed, "{span:?} len={n} m={m}");
            }
        }
    }
}

/// A random layer: the teacher's projections, φ of the given kind, the mix.
fn random_layer(
    (h, hkv, d, hidden): (usize, usize, usize, usize),
    kind: crate::config::FeatureKind,
    (mix, rule): (Mix, LinearRule),
    dtype: DType,
    var: &mut dyn FnMut(Tensor) -> Tensor,
) -> WindowAttention {
    use crate::config::FeatureKind;
    let dev = Device::Cpu;
    let mut w = |shape: &[usize], std: f64| var(randn(shape, std).to_dtype(dtype).unwrap());
    let lin = |w: Tensor| Linear::new(w, None);
    let (q, k, v, o) = (
        lin(w(&[h * d, hidden], 0.5)),
        lin(w(&[hkv * d, hidden], 0.5)),
        lin(w(&[hkv * d, hidden], 0.5)),
        lin(w(&[hidden, h * d], 0.3)),
    );
    let (phi, f) = match kind {
        FeatureKind::Relu => (
            FeatureMap::Relu {
                q: Linear::new(w(&[h * d, h * d], 0.2), Some(w(&[h * d], 0.1))),
                k: (hkv != h)
                    .then(|| Linear::new(w(&[hkv * d, hkv * d], 0.2), Some(w(&[hkv * d], 0.1)))),
            },
            d,
        ),
        FeatureKind::Hedgehog => (
            FeatureMap::Hedgehog {
                q: w(&[h, d, d], 0.5),
                k: w(&[hkv, d, d], 0.5),
            },
            2 * d,
        ),
        FeatureKind::Taylor => (
            FeatureMap::Taylor {
                q: w(&[h, d, 3], 0.3),
                k: w(&[hkv, d, 3], 0.3),
            },
            crate::attention::feature_map::taylor_features(3),
        ),
    };
    let mix_logit = w(&[h], 1.0);
    let delta = (rule == LinearRule::Delta).then(|| w(&[h, f + 1], 0.5));
    // Learned decays: the training form reads θ, the slice forms sigmoid(θ).
    let theta = crate::attention::supra::decay_logits(&Decay::Lightning.gammas(h).unwrap());
    let theta = var(Tensor::new(theta, &dev).unwrap().to_dtype(dtype).unwrap());
    WindowAttention {
        proj: crate::attention::Projections {
            q,
            k,
            v,
            o,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
        },
        phi,
        mix_logit,
        mix,
        feature_dim: f,
        gammas: HeadDecays::Learned(theta),
        delta,
        chunk_size: 5,
        span: SPAN,
        rope: crate::model::rope::Rope::new(d, 10_000.0, 512, &dev).unwrap(),
        branches: Branches::Both,
    }
}

/// The whole layer (φ of each kind, RoPE, GQA, both mixes, the sinks at either positions):
/// training form in one chunk and in chunks, inference prefill, and a prefill continued token
/// by token, whose state is saved and restored midway.
#[test]
fn layer_forms_agree_and_states_round_trip() {
    use crate::config::FeatureKind;
    let dev = Device::Cpu;
    let cases = [
        FeatureKind::Relu,
        FeatureKind::Hedgehog,
        FeatureKind::Taylor,
    ]
    .into_iter()
    .flat_map(|k| LINEARS.map(|m| (k, m)))
    .flat_map(|(k, m)| [SPAN, CACHE].map(|s| (k, m, s)));
    for (kind, mix, span) in cases {
        for (h, hkv) in [(9, 3), (4, 4)] {
            let mut layer = random_layer((h, hkv, 8, 24), kind, mix, DType::F32, &mut |t| t);
            layer.span = span;
            let t = 3 * W + 5;
            let x = Tensor::randn(0f32, 1.0, (2, t, 24), &dev).unwrap();
            layer.chunk_size = usize::MAX;
            let want = flat(&layer.forward(&x, 0, None, Exec::Train).unwrap());
            let label = format!("{kind:?} {mix:?} {:?} H={h}/{hkv}", span.sink_positions);
            for c in [4, 16] {
                layer.chunk_size = c;
                for exec in [Exec::Train, Exec::Infer] {
                    let got = flat(&layer.forward(&x, 0, None, exec).unwrap());
                    let e = rel_err(&got, &want);
                    assert!(e < 1e-5, "{label} C={c} {exec:?}: {e}");
                }
            }
            let cell = Cell::Window(layer.clone());
            let x0 = x.narrow(0, 0, 1).unwrap();
            let split = W + 2;
            let mut state = cell.new_state(0);
            let mut outs = vec![cell
                .forward(
                    &x0.narrow(1, 0, split).unwrap(),
                    0,
                    Some(&mut state),
                    Exec::Infer,
                )
                .unwrap()];
            for i in split..t {
                if i == 2 * W + 1 {
                    // Saved and restored: the continuation cannot tell.
                    let mut named: std::collections::HashMap<_, _> =
                        state.named_tensors("l").unwrap().into_iter().collect();
                    state = cell.state_from_tensors(&named, "l", i).unwrap();
                    // Before the window is full, another position keeps another count.
                    assert!(cell.state_from_tensors(&named, "l", W).is_err());
                    named.remove("l.linear");
                    assert!(cell.state_from_tensors(&named, "l", i).is_err());
                }
                let xi = x0.narrow(1, i, 1).unwrap();
                outs.push(cell.forward(&xi, i, Some(&mut state), Exec::Infer).unwrap());
            }
            let cont = flat(&Tensor::cat(&outs, 1).unwrap());
            let e = rel_err(&cont, &want[..want.len() / 2]);
            assert!(e < 1e-5, "{label} prefill + steps: {e}");
            assert_eq!(state.bytes(), cell.state_bytes(t), "{label}");
        }
    }
}

/// With the sinks at their cache positions and the window alone, token n past s + w − 1 is
/// the teacher's attention over a sequence of the sinks and the window only, as StreamingLLM's
/// cache holds them: the sinks at 0..s, the window's w tokens at s..s + w, the query last.
/// With absolute positions it is not (the test's own control).
#[test]
fn cache_positions_are_streaming_llms_cache() {
    use crate::config::FeatureKind;
    let dev = Device::Cpu;
    let t = 3 * W + 5;
    let x = Tensor::randn(0f32, 1.0, (1, t, 16), &dev).unwrap();
    for (span, same) in [(CACHE, true), (SPAN, false)] {
        let mut layer = random_layer(
            (4, 2, 8, 16),
            FeatureKind::Relu,
            (Mix::Shared, LinearRule::Add),
            DType::F32,
            &mut |t| t,
        );
        layer.span = span;
        layer.branches = Branches::Window;
        let teacher = layer.teacher();
        for exec in [Exec::Train, Exec::Infer] {
            let ours = layer.forward(&x, 0, None, exec).unwrap();
            for n in [S + W - 1, S + W + 3, t - 1] {
                let kept = Tensor::cat(
                    &[
                        &x.narrow(1, 0, S).unwrap(),
                        &x.narrow(1, n + 1 - W, W).unwrap(),
                    ],
                    1,
                )
                .unwrap();
                let cache = teacher.forward(&kept, 0, None, Exec::Infer).unwrap();
                let want = flat(&cache.narrow(1, S + W - 1, 1).unwrap());
                let e = rel_err(&flat(&ours.narrow(1, n, 1).unwrap()), &want);
                // At n = s + w − 1 the two positions agree.
                let label = format!("{:?} {exec:?} n={n}", span.sink_positions);
                if same || n == S + W - 1 {
                    assert!(e < 1e-5, "{label}: {e}");
                } else {
                    assert!(e > 1e-3, "{label}: {e}");
                }
            }
        }
    }
}

/// The state stops growing once the window is full.
#[test]
fn state_size_is_constant_in_the_context() {
    let layer = random_layer(
        (4, 2, 8, 16),
        crate::config::FeatureKind::Relu,
        (Mix::Shared, LinearRule::Add),
        DType::F32,
        &mut |t| t,
    );
    let cell = Cell::Window(layer);
    let mut state = cell.new_state(0);
    let mut sizes = Vec::new();
    let mut pos = 0;
    for n in [W + S, 50, 200] {
        let x = Tensor::randn(0f32, 1.0, (1, n, 16), &Device::Cpu).unwrap();
        cell.forward(&x, pos, Some(&mut state), Exec::Infer)
            .unwrap();
        pos += n;
        sizes.push(state.bytes());
    }
    assert!(sizes.windows(2).all(|w| w[0] == w[1]), "{sizes:?}");
    assert_eq!(sizes[0], cell.state_bytes(1_000_000));
}

/// Finite differences in f64 for every new parameter: φ (relu weight and bias, queries' and
/// keys' own under GQA; hedgehog's and taylor's per-head matrices), the mix θ and the decay θ, through both
/// mixes.
#[test]
fn gradients_match_finite_differences_for_every_new_parameter() {
    use crate::config::FeatureKind;
    for kind in [
        FeatureKind::Relu,
        FeatureKind::Hedgehog,
        FeatureKind::Taylor,
    ] {
        for mix in LINEARS {
            let mut vars = Vec::new();
            let layer = random_layer((4, 2, 4, 8), kind, mix, DType::F64, &mut |t| {
                let v = Var::from_tensor(&t).unwrap();
                vars.push(v.clone());
                v.as_tensor().clone()
            });
            let x = randn(&[1, 2 * W + 3, 8], 1.0);
            let r = randn(&[1, 2 * W + 3, 8], 1.0);
            let loss = || {
                let y = layer.forward(&x, 0, None, Exec::Train).unwrap();
                (y * &r).unwrap().sum_all().unwrap()
            };
            // q, k, v, o, then φ's (relu: q weight, q bias, k weight, k bias; per-head maps: q, k),
            // then the mix θ, the delta rule's parameters where it has them, then the decay θ.
            let label = format!("{kind:?} {mix:?}");
            for (i, v) in vars.iter().enumerate().skip(4) {
                check_grad(v, loss, &format!("{label} parameter {i}"));
            }
        }
    }
}
