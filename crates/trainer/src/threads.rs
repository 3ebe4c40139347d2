//! Work spread over a few scoped threads, each running libtorch on its own share of the
//! threads: for training steps whose operations are too small to split one by one
//! (`crate::parts`, `AdamW::step_with`).

/// Runs `work` on each of `items`, round-robin over at most `threads` scoped threads, each
/// running libtorch with `threads / workers` intra-op threads (at least one); returns the
/// results in `items`' order. A panic on a thread is resumed on the caller's.
///
/// libtorch keeps one global intra-op count, which a new thread takes on, and changing it
/// rebuilds a thread pool of libtorch's: callers that run this often keep that count at what
/// their threads use (training in parts sets it to one for its steps, `Session::step`).
pub fn on_threads<I: Send, O: Send>(
    items: Vec<I>,
    threads: usize,
    work: impl Fn(usize, I) -> O + Sync,
) -> Vec<O> {
    let workers = items.len().min(threads).max(1);
    let per_worker = (threads / workers).max(1) as i32;
    let mut queues: Vec<Vec<(usize, I)>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        queues[i % workers].push((i, item));
    }
    let work = &work;
    let mut done: Vec<(usize, O)> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .map(|queue| {
                s.spawn(move || {
                    if tch::get_num_threads() != per_worker {
                        tch::set_num_threads(per_worker);
                    }
                    queue
                        .into_iter()
                        .map(|(i, item)| (i, work(i, item)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, o)| o).collect()
}

/// `items` in `groups` groups of about equal total `size` (largest first, each to the lightest
/// group so far), for [`on_threads`] with one group per thread.
pub fn balanced<T>(items: Vec<T>, groups: usize, size: impl Fn(&T) -> i64) -> Vec<Vec<T>> {
    let groups = groups.max(1);
    let mut sized: Vec<(i64, T)> = items.into_iter().map(|t| (size(&t), t)).collect();
    sized.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
    let mut out: Vec<(i64, Vec<T>)> = (0..groups).map(|_| (0, Vec::new())).collect();
    for (s, t) in sized {
        let lightest = out
            .iter_mut()
            .min_by_key(|(total, _)| *total)
            .expect("at least one group");
        lightest.0 += s;
        lightest.1.push(t);
    }
    out.into_iter()
        .map(|(_, g)| g)
        .filter(|g| !g.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order_whatever_the_thread_count() {
        for threads in [1, 2, 3, 8] {
            let got = on_threads((0..7).collect(), threads, |i, x: i32| (i, x * 10));
            let want: Vec<(usize, i32)> = (0..7).map(|i| (i as usize, i * 10)).collect();
            assert_eq!(got, want, "{threads} threads");
        }
    }

    #[test]
    fn balanced_groups_even_out_the_sizes() {
        let groups = balanced(vec![9, 1, 1, 4, 4, 1], 2, |&x| x);
        let totals: Vec<i64> = groups.iter().map(|g| g.iter().sum()).collect();
        assert_eq!(totals.iter().sum::<i64>(), 20);
        assert_eq!(totals, vec![10, 10]);
        assert_eq!(balanced(vec![5], 4, |&x| x).len(), 1);
    }
}
