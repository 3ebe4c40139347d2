//! Users: who they are, what they like, and the sessions in which they show it.
//!
//! Tastes are latent: two to four favourite leaf categories (drawn with demographic affinities,
//! so profile features carry some signal even for users without history) with peaked weights,
//! and for some of their top-level categories one or two favourite brands. A share
//! `taste_strength` of sessions goes to a favourite leaf (often hunting a favourite brand), the
//! rest to a leaf drawn by global popularity. The next item is thus predictable from the
//! content of the history — the signal a two-tower model learns and a popularity ranking lacks.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::catalog::Catalog;
use super::sample::{exponential, mix, normal, pick, zipf_rank, Shuffle, Weighted};
use super::SyntheticConfig;
use features::records::{Event, EventType, User};

const GENDERS: [&str; 2] = ["f", "m"];
const AGES: [&str; 6] = ["18-24", "25-34", "35-44", "45-54", "55-64", "65+"];
const AGE_WEIGHTS: [f64; 6] = [0.12, 0.24, 0.22, 0.18, 0.14, 0.10];
/// Country, share of users, UTC offset in hours (for the time of day sessions happen).
const COUNTRIES: [(&str, f64, f64); 8] = [
    ("us", 0.45, -6.0),
    ("gb", 0.12, 0.0),
    ("de", 0.12, 1.0),
    ("ca", 0.07, -5.0),
    ("fr", 0.07, 1.0),
    ("au", 0.06, 10.0),
    ("it", 0.06, 1.0),
    ("es", 0.05, 1.0),
];

/// Session funnel. Per view: watch, add to cart, then purchase given cart, and a refining
/// search; sessions open with a search or a direct view. Sessions end when their share of the
/// user's events is used, which cuts some funnels short; net of that, these give about 70%
/// views, 10% watches, 8% add-to-carts, 4% purchases and 8% searches.
const P_SEARCH_START: f64 = 0.4;
const P_WATCH: f64 = 0.175;
const P_CART: f64 = 0.15;
const P_BUY_AFTER_CART: f64 = 0.6;
const P_REFINE: f64 = 0.03;
/// Mean events per session, less one.
const SESSION_EXTRA: f64 = 5.5;
/// Share of favourite-leaf sessions spent looking for a favourite brand.
const P_BRAND_SESSION: f64 = 0.6;
/// Each user's fewest events (lowered when the config has fewer events per user).
const MIN_EVENTS: u64 = 5;

const USER_SALT: u64 = 0x05E4_0000;
const AFFINITY_SALT: u64 = 0xAFF1_0000;
const ACTIVITY_SALT: u64 = 0xAC71_0000;
const DAY_MS: i64 = 86_400_000;
const HOUR_MS: f64 = 3_600_000.0;

pub(super) struct Population {
    /// Leaf distribution for first favourites, per gender × age group.
    tables: Vec<Weighted>,
    /// User index → activity quantile, so activity is not ordered by user id.
    activity: Shuffle,
    activity_total: f64,
    skew: f64,
    users: u64,
    min_events: u64,
    spare_events: u64,
    seed: u64,
    days: i64,
    taste_strength: f64,
}

struct Taste {
    leaves: Vec<usize>,
    weights: Weighted,
    /// (top-level category, brand index) pairs.
    brands: Vec<(usize, u32)>,
}

impl Population {
    pub fn new(cfg: &SyntheticConfig, catalog: &Catalog) -> Population {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(AFFINITY_SALT, cfg.seed));
        let mut affinity = |groups: usize| -> Vec<Vec<f64>> {
            (0..groups)
                .map(|_| {
                    catalog
                        .tops
                        .iter()
                        .map(|_| (0.7 * normal(&mut rng)).exp())
                        .collect()
                })
                .collect()
        };
        let (by_gender, by_age) = (affinity(GENDERS.len()), affinity(AGES.len()));
        let mut tables = Vec::new();
        for g in &by_gender {
            for a in &by_age {
                let weights = catalog
                    .leaves
                    .iter()
                    .enumerate()
                    .map(|(l, leaf)| catalog.leaf_pop.weight(l) * g[leaf.top] * a[leaf.top]);
                tables.push(Weighted::new(weights));
            }
        }
        let skew = cfg.activity_skew;
        let activity_total = (0..cfg.users)
            .map(|q| activity_weight(q, cfg.users, skew))
            .sum();
        let min_events = MIN_EVENTS.min(cfg.events / cfg.users);
        Population {
            tables,
            activity: Shuffle::new(cfg.users, mix(ACTIVITY_SALT, cfg.seed)),
            activity_total,
            skew,
            users: cfg.users,
            min_events,
            spare_events: cfg.events - min_events * cfg.users,
            seed: cfg.seed,
            days: cfg.days as i64,
            taste_strength: cfg.taste_strength,
        }
    }

    /// User `index` and all their events, sorted by (time, item id) with searches first.
    pub fn user(&self, catalog: &Catalog, index: u64) -> (User, Vec<Event>) {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(USER_SALT ^ self.seed, index));
        let user_id = index + 1;
        let g = rng.random_range(0..GENDERS.len());
        let a = pick(&mut rng, &AGE_WEIGHTS);
        let (country, _, utc_offset) = COUNTRIES[pick(&mut rng, &COUNTRIES.map(|c| c.1))];
        let features = vec![
            format!("age:{}", AGES[a]),
            format!("country:{country}"),
            format!("gender:{}", GENDERS[g]),
        ];
        let taste = self.taste(catalog, g, a, &mut rng);

        // Split the user's events into sessions, then spread the sessions over the days since
        // the user joined, at times of day around their local evening.
        let total = self.events_for(index, &mut rng);
        let mut lengths = Vec::new();
        let mut left = total;
        while left > 0 {
            let len = (1 + (exponential(&mut rng) * SESSION_EXTRA) as u64).min(left);
            lengths.push(len);
            left -= len;
        }
        let join_day = (self.days as f64 * 0.6 * rng.random::<f64>().powi(2)) as i64;
        let peak_hour = 20.0 - utc_offset;
        let mut starts: Vec<i64> = (0..lengths.len())
            .map(|_| {
                let day = rng.random_range(join_day..self.days);
                let hour = (peak_hour + 3.0 * normal(&mut rng)).rem_euclid(24.0);
                catalog.start_ms + day * DAY_MS + (hour * HOUR_MS) as i64
            })
            .collect();
        starts.sort_unstable();

        let mut events = Vec::with_capacity(total as usize);
        let mut free_at = i64::MIN;
        for (&len, &start) in lengths.iter().zip(&starts) {
            let mut s = Session {
                out: &mut events,
                user_id,
                t: start.max(free_at),
                left: len,
                started: false,
            };
            self.session(catalog, &taste, &mut s, &mut rng);
            free_at = s.t + rng.random_range(60_000..1_800_000);
        }
        // Already in this order by construction; sorting makes the contract explicit.
        events.sort_by_key(|e| (e.ts_ms, e.item_id.unwrap_or(0)));
        (User { user_id, features }, events)
    }

    /// Events of user `index`: a log-logistic share of the events left after each user's
    /// minimum, by a deterministic activity quantile, so the total is within rounding of the
    /// config's without a pass over all users.
    fn events_for(&self, index: u64, rng: &mut impl Rng) -> u64 {
        let w = activity_weight(self.activity.apply(index), self.users, self.skew);
        let x = self.spare_events as f64 * w / self.activity_total;
        self.min_events + x as u64 + (rng.random::<f64>() < x.fract()) as u64
    }

    fn taste(&self, catalog: &Catalog, g: usize, a: usize, rng: &mut impl Rng) -> Taste {
        let table = &self.tables[g * AGES.len() + a];
        let first = table.sample(rng.random());
        let mut leaves = vec![first];
        for _ in 1..rng.random_range(2..=4) {
            // Half the further favourites are siblings within the first one's top category.
            let sibling = rng.random_bool(0.5);
            let u = rng.random();
            let l = sibling
                .then(|| table.sample_in(u, catalog.tops[catalog.leaves[first].top].leaves.clone()))
                .flatten()
                .unwrap_or_else(|| table.sample(u));
            if !leaves.contains(&l) {
                leaves.push(l);
            }
        }
        // Squared exponentials are more peaked than Dirichlet(1): most users have one main
        // interest and some side ones.
        let weights = Weighted::new(leaves.iter().map(|_| exponential(rng).powi(2)));
        let mut brands = Vec::new();
        let mut tops: Vec<usize> = leaves.iter().map(|&l| catalog.leaves[l].top).collect();
        tops.sort_unstable();
        tops.dedup();
        for top in tops {
            if rng.random_bool(0.7) {
                for _ in 0..1 + rng.random_bool(0.3) as usize {
                    let n = catalog.tops[top].brands.len() as u64;
                    brands.push((top, zipf_rank(rng.random(), n, 1.0) as u32));
                }
            }
        }
        Taste {
            leaves,
            weights,
            brands,
        }
    }

    /// One session: an optional opening search, then views in one leaf with the funnel after
    /// each view, until the session's share of events is used.
    fn session(&self, catalog: &Catalog, taste: &Taste, s: &mut Session<'_>, rng: &mut impl Rng) {
        let favourite = rng.random_bool(self.taste_strength);
        let leaf = if favourite {
            taste.leaves[taste.weights.sample(rng.random())]
        } else {
            catalog.leaf_pop.sample(rng.random())
        };
        let top = catalog.leaves[leaf].top;
        let mut wanted = [0u32; 8];
        let mut n = 0;
        if favourite && rng.random_bool(P_BRAND_SESSION) {
            for &(_, b) in taste
                .brands
                .iter()
                .filter(|(t, _)| *t == top)
                .take(wanted.len())
            {
                wanted[n] = b;
                n += 1;
            }
        }
        let brands = &wanted[..n];
        let brand = brands.first().copied();

        if rng.random_bool(P_SEARCH_START) {
            s.advance(0);
            let q = catalog.query(leaf, brand, rng);
            s.push(EventType::Search, None, Some(q), None);
        }
        let mut last = None;
        while s.left > 0 {
            let t = s.advance(rng.random_range(8_000..150_000));
            // People do go back to an item, but not view by view: redraw most repeats.
            let mut item = catalog.pick_item(leaf, t, brands, rng);
            for _ in 0..3 {
                if last != Some(item) {
                    break;
                }
                item = catalog.pick_item(leaf, t, brands, rng);
            }
            last = Some(item);
            s.push(EventType::View, Some(item), None, None);
            if s.left > 0 && rng.random_bool(P_WATCH) {
                s.advance(rng.random_range(2_000..30_000));
                s.push(EventType::Watch, Some(item), None, None);
            }
            if s.left > 0 && rng.random_bool(P_CART) {
                s.advance(rng.random_range(5_000..60_000));
                s.push(EventType::AddToCart, Some(item), None, None);
                if s.left > 0 && rng.random_bool(P_BUY_AFTER_CART) {
                    s.advance(rng.random_range(30_000..300_000));
                    let quantity =
                        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0][rng.random_range(0..10)];
                    s.push(EventType::Purchase, Some(item), None, Some(quantity));
                }
            }
            if s.left > 0 && rng.random_bool(P_REFINE) {
                s.advance(rng.random_range(5_000..40_000));
                let q = catalog.query(leaf, brand, rng);
                s.push(EventType::Search, None, Some(q), None);
            }
        }
    }
}

/// Relative activity of the user at quantile `q` of `n`: log-logistic, (p / (1 - p))^skew.
fn activity_weight(q: u64, n: u64, skew: f64) -> f64 {
    let p = (q as f64 + 0.5) / n as f64;
    (p / (1.0 - p)).powf(skew)
}

/// Writes one session's events, advancing its clock and counting down its event budget.
struct Session<'a> {
    out: &'a mut Vec<Event>,
    user_id: u64,
    t: i64,
    left: u64,
    started: bool,
}

impl Session<'_> {
    /// Moves the clock `gap_ms` on (the session's first event stays at its start) and returns it.
    fn advance(&mut self, gap_ms: i64) -> i64 {
        if self.started {
            self.t += gap_ms;
        }
        self.started = true;
        self.t
    }

    fn push(
        &mut self,
        event_type: EventType,
        item: Option<u64>,
        query: Option<String>,
        value: Option<f32>,
    ) {
        let item_id = item.map(|i| i + 1);
        self.out.push(Event {
            user_id: self.user_id,
            ts_ms: self.t,
            event_type,
            item_id,
            query,
            value,
        });
        self.left -= 1;
    }
}
