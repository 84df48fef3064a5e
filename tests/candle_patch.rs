//! The vendored candle-core's backprop changes (vendor/candle-core/SUPRA_PATCH.md).

use candle_core::{Device, Tensor, Var};

/// A product, quotient or matmul with a tensor that no variable stands behind gives that
/// tensor no gradient (upstream computes and stores one), and the variable's gradients are
/// the analytic ones.
#[test]
fn constants_get_no_gradient_and_variables_the_right_one() {
    let dev = Device::Cpu;
    let x = Var::new(&[[1f32, 2.0], [3.0, -4.0]], &dev).unwrap();
    let c = Tensor::new(&[[0.5f32, -1.0], [2.0, 4.0]], &dev).unwrap();
    let m = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
    let x_t = x.as_tensor();
    // loss = Σ x⊙c + Σ x/c + Σ (x·m) + Σ (m·x)
    let loss = ((x_t * &c).unwrap().sum_all().unwrap()
        + (x_t / &c).unwrap().sum_all().unwrap()
        + x_t.matmul(&m).unwrap().sum_all().unwrap()
        + m.matmul(x_t).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(&c).is_none() && grads.get(&m).is_none());
    // d/dx: c + 1/c + (row sums of m, per column of x: Σ_j m[k, j] for x[i, k])
    //       + (column sums of m, per row of x: Σ_i m[i, r] for x[r, j]).
    let want = [
        [0.5f32 + 2.0 + 3.0 + 4.0, -1.0 - 1.0 + 7.0 + 4.0],
        [2.0 + 0.5 + 3.0 + 6.0, 4.0 + 0.25 + 7.0 + 6.0],
    ];
    let got = grads.get(x_t).unwrap().to_vec2::<f32>().unwrap();
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}
