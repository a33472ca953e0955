//! The fair scheduler's choices, kept free of I/O so they can be tested
//! alone: which queue a worker fetches from next.
//!
//! Two levels:
//! - **Class**: interactive before normal before batch, except that a lower
//!   class with backlog is picked whenever its share of recently served work
//!   is below its guaranteed minimum (`scheduler.min_share_*`).
//! - **Tenant** within the class: weighted fair queuing on work, not
//!   requests. Each tenant has a virtual token counter (tokens served divided
//!   by its weight); the backlogged tenant with the smallest counter goes
//!   next. A job is charged its estimated tokens when fetched and corrected
//!   by its real usage when it returns. The ingress's estimate (prompt size
//!   plus requested output) is scaled by what the tenant's jobs really used
//!   relative to their estimates lately, so that a running job's charge is
//!   close to its final cost: with raw estimates far above the real usage,
//!   the charges of running jobs would outweigh the served work, and shares
//!   would follow the jobs in flight instead of the weights. A tenant that becomes backlogged
//!   after being idle is lifted to just below the smallest counter among the
//!   backlogged ones: it goes next (its first job does not wait behind
//!   another tenant's backlog), but idle time banks no credit.
//!
//! This is deficit round robin with a quantum of one job and the deficit
//! counted in tokens (see docs/decisions/0009-fair-queues.md).

use std::collections::{HashMap, HashSet};

use sluice_core::wire::envelope::Class;
use uuid::Uuid;

/// A tenant queue: one JetStream subject `jobs.<pool>.<class>.<tenant>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueKey {
    pub pool: String,
    pub class: Class,
    pub tenant: Uuid,
}

/// How quickly the class shares forget: each charge keeps this fraction of
/// what was served before, so the shares follow roughly the last 1/(1−x)
/// jobs' worth of tokens.
const CLASS_MEMORY: f64 = 0.995;

#[derive(Debug)]
pub struct Fair {
    /// Virtual token counter of each tenant: tokens served / weight.
    counters: HashMap<Uuid, f64>,
    /// Real usage over estimate of each tenant's recent jobs (moving average).
    accuracy: HashMap<Uuid, f64>,
    /// Recently served tokens per class, decaying.
    class_served: [f64; 3],
    min_share: [f64; 3],
    /// Tenants that had backlog at the previous pick.
    active: HashSet<Uuid>,
    /// When each queue was last picked, to rotate a tenant's pools.
    turns: HashMap<QueueKey, u64>,
    clock: u64,
}

impl Fair {
    pub fn new(min_share_normal: f64, min_share_batch: f64) -> Self {
        Self {
            counters: HashMap::new(),
            accuracy: HashMap::new(),
            class_served: [0.0; 3],
            min_share: [0.0, min_share_normal, min_share_batch],
            active: HashSet::new(),
            turns: HashMap::new(),
            clock: 0,
        }
    }

    /// Picks the next queue among `backlogged`.
    pub fn pick(&mut self, backlogged: &[QueueKey]) -> Option<QueueKey> {
        if backlogged.is_empty() {
            self.active.clear();
            return None;
        }
        self.lift_newcomers(backlogged);
        let class = self.pick_class(backlogged)?;
        let tenant = backlogged
            .iter()
            .filter(|q| q.class == class)
            .map(|q| q.tenant)
            .min_by(|a, b| self.counter(*a).total_cmp(&self.counter(*b)).then_with(|| a.cmp(b)))?;
        let queue = backlogged
            .iter()
            .filter(|q| q.class == class && q.tenant == tenant)
            .min_by_key(|q| self.turns.get(*q).copied().unwrap_or(0))?
            .clone();
        self.clock += 1;
        self.turns.insert(queue.clone(), self.clock);
        Some(queue)
    }

    /// Charges a fetched job's expected tokens to its tenant.
    pub fn charge(&mut self, tenant: Uuid, tokens: f64, weight: u32) {
        self.correct(tenant, tokens, weight);
    }

    /// What to charge for a job whose ingress estimate is `estimate`.
    pub fn expected(&self, tenant: Uuid, estimate: f64) -> f64 {
        estimate * self.accuracy.get(&tenant).copied().unwrap_or(1.0)
    }

    /// A job charged `charged` (from an ingress estimate `estimate`) used
    /// `used` tokens: corrects the tenant's counter, learns its accuracy, and
    /// counts the tokens to its class. Class shares count real usage only: an
    /// early estimate far from it would skew them for a long while.
    pub fn complete(&mut self, tenant: Uuid, class: Class, estimate: f64, charged: f64, used: f64, weight: u32) {
        self.correct(tenant, used - charged, weight);
        for served in &mut self.class_served {
            *served *= CLASS_MEMORY;
        }
        self.class_served[class.index()] += used.max(0.0);
        if estimate > 0.0 {
            let a = self.accuracy.entry(tenant).or_insert(1.0);
            *a = 0.8 * *a + 0.2 * (used / estimate);
        }
    }

    fn correct(&mut self, tenant: Uuid, tokens: f64, weight: u32) {
        *self.counters.entry(tenant).or_insert(0.0) += tokens / f64::from(weight.max(1));
    }

    /// Forgets tenants and queues with no backlog, keeping memory bounded
    /// by the active ones.
    pub fn forget_idle(&mut self, live: &HashSet<QueueKey>) {
        let tenants: HashSet<Uuid> = live.iter().map(|q| q.tenant).collect();
        self.counters.retain(|t, _| tenants.contains(t));
        self.accuracy.retain(|t, _| tenants.contains(t));
        self.turns.retain(|q, _| live.contains(q));
    }

    fn counter(&self, tenant: Uuid) -> f64 {
        self.counters.get(&tenant).copied().unwrap_or(0.0)
    }

    fn lift_newcomers(&mut self, backlogged: &[QueueKey]) {
        let now: HashSet<Uuid> = backlogged.iter().map(|q| q.tenant).collect();
        let floor = self.active.iter().filter(|t| now.contains(t)).map(|t| self.counter(*t)).reduce(f64::min);
        if let Some(floor) = floor {
            for tenant in now.iter().filter(|t| !self.active.contains(t)) {
                let c = self.counters.entry(*tenant).or_insert(0.0);
                // Just below the floor: the newcomer goes next, but brings no credit.
                *c = c.max(floor - 1.0);
            }
        }
        self.active = now;
    }

    fn pick_class(&self, backlogged: &[QueueKey]) -> Option<Class> {
        let has = |c: Class| backlogged.iter().any(|q| q.class == c);
        let highest = Class::ALL.into_iter().find(|c| has(*c))?;
        let total: f64 = self.class_served.iter().sum();
        // Lowest class first: the one furthest from the front gets its
        // guarantee checked first.
        for class in [Class::Batch, Class::Normal] {
            if class > highest && has(class) {
                let share = if total > 0.0 { self.class_served[class.index()] / total } else { 0.0 };
                if share < self.min_share[class.index()] {
                    return Some(class);
                }
            }
        }
        Some(highest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(class: Class, tenant: Uuid) -> QueueKey {
        QueueKey { pool: "p".into(), class, tenant }
    }

    /// Serves `n` jobs of `cost` tokens from always-backlogged queues;
    /// returns the jobs each tenant got.
    fn serve(
        fair: &mut Fair,
        queues: &[QueueKey],
        weights: &HashMap<Uuid, u32>,
        n: usize,
        cost: impl Fn(Uuid) -> f64,
    ) -> HashMap<Uuid, usize> {
        let mut got = HashMap::new();
        for _ in 0..n {
            let pick = fair.pick(queues).unwrap();
            let w = weights[&pick.tenant];
            let c = cost(pick.tenant);
            fair.charge(pick.tenant, c, w);
            fair.complete(pick.tenant, pick.class, c, c, c, w);
            *got.entry(pick.tenant).or_insert(0) += 1;
        }
        got
    }

    #[test]
    fn shares_follow_weights() {
        let tenants: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let weights: HashMap<Uuid, u32> = tenants.iter().copied().zip([1, 2, 4]).collect();
        let queues: Vec<QueueKey> = tenants.iter().map(|t| q(Class::Normal, *t)).collect();
        let mut fair = Fair::new(0.2, 0.05);
        let got = serve(&mut fair, &queues, &weights, 700, |_| 100.0);
        assert_eq!([got[&tenants[0]], got[&tenants[1]], got[&tenants[2]]], [100, 200, 400]);
    }

    #[test]
    fn shares_count_tokens_not_requests() {
        let (big, small) = (Uuid::new_v4(), Uuid::new_v4());
        let weights: HashMap<Uuid, u32> = [(big, 1), (small, 1)].into();
        let queues = vec![q(Class::Normal, big), q(Class::Normal, small)];
        let mut fair = Fair::new(0.2, 0.05);
        let got = serve(&mut fair, &queues, &weights, 1100, |t| if t == big { 1000.0 } else { 100.0 });
        // Equal tokens: the tenant with 10× longer prompts gets 1/11 of the jobs.
        assert_eq!(got[&big], 100);
        assert_eq!(got[&small], 1000);
    }

    #[test]
    fn a_newcomer_goes_next_without_banked_credit() {
        let (flood, late) = (Uuid::new_v4(), Uuid::new_v4());
        let weights: HashMap<Uuid, u32> = [(flood, 1), (late, 1)].into();
        let mut fair = Fair::new(0.2, 0.05);
        serve(&mut fair, &[q(Class::Normal, flood)], &weights, 50, |_| 10.0);
        let both = [q(Class::Normal, flood), q(Class::Normal, late)];
        assert_eq!(fair.pick(&both).unwrap().tenant, late);
        fair.charge(late, 10.0, 1);
        fair.complete(late, Class::Normal, 10.0, 10.0, 10.0, 1);
        // From then on they alternate: the late tenant got no credit for its idle time.
        let got = serve(&mut fair, &both, &weights, 100, |_| 10.0);
        assert_eq!(got[&late], 50);
    }

    #[test]
    fn charges_learn_how_far_estimates_are_from_real_usage() {
        let t = Uuid::new_v4();
        let mut fair = Fair::new(0.2, 0.05);
        assert_eq!(fair.expected(t, 300.0), 300.0);
        for _ in 0..30 {
            let charged = fair.expected(t, 300.0);
            fair.charge(t, charged, 1);
            fair.complete(t, Class::Normal, 300.0, charged, 30.0, 1);
        }
        assert!((fair.expected(t, 300.0) - 30.0).abs() < 1.0, "{}", fair.expected(t, 300.0));
        // Whatever was charged, the counter ends at the real usage.
        assert!((fair.counter(t) - 900.0).abs() < 1e-6, "{}", fair.counter(t));
    }

    #[test]
    fn lower_classes_keep_their_minimum_share() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let weights: HashMap<Uuid, u32> = [(a, 1), (b, 1)].into();
        let queues = vec![q(Class::Interactive, a), q(Class::Batch, b)];
        let mut fair = Fair::new(0.2, 0.1);
        let got = serve(&mut fair, &queues, &weights, 1000, |_| 50.0);
        let batch = got[&b] as f64 / 1000.0;
        assert!((0.09..=0.12).contains(&batch), "batch share {batch}");
        // Without a higher class in the way, batch takes everything.
        let got = serve(&mut fair, &[q(Class::Batch, b)], &weights, 10, |_| 50.0);
        assert_eq!(got[&b], 10);
    }
}
