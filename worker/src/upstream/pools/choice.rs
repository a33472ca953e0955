//! Which deployment takes a call: a weighted random split of the calls
//! wanted over the deployments that are ready.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// How many of `want` calls each of the deployments with these `weights`
/// is asked for, drawn at random in proportion to its weight.
pub(super) fn spread(weights: &[u64], want: usize) -> Vec<usize> {
    let total: u64 = weights.iter().sum();
    let mut asked = vec![0usize; weights.len()];
    if weights.is_empty() {
        return asked;
    }
    for _ in 0..want {
        let mut r = random() % total.max(1);
        let i = weights
            .iter()
            .position(|w| {
                if r < *w {
                    true
                } else {
                    r -= w;
                    false
                }
            })
            .unwrap_or(0);
        asked[i] += 1;
    }
    asked
}

/// A cheap pseudo-random number (splitmix64 over a shared counter): good
/// enough to spread calls by weight.
fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed) ^ u64::from(std::process::id());
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
