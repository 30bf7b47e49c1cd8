//! The blocking-query loop every watch runs, with Consul's rules:
//!
//! - pass the last `X-Consul-Index` back with `wait`, so Consul holds the
//!   request until something changes;
//! - reset the index to 0 when it goes backwards (a server restored from a
//!   snapshot, another server answering) or is 0, and never spin: a reset
//!   right after a reset waits first;
//! - on an error or an untrusted answer keep the index and what is known,
//!   and wait a jittered, growing delay ([`Backoff`]);
//! - reads go to the leader, which sees a change as soon as it is
//!   committed; with `stale` (for large meshes) any server answers, a
//!   follower only after the leader's next heartbeat, and the `trust`
//!   rules keep answers from a server without a leader from shrinking a set;
//! - every read tells the hub whether Consul answered, and a loop in
//!   backoff retries at once when another one finds Consul back.

use std::{future::Future, time::Duration};

use consul_client::{Client, Error, QueryOptions, QueryResult};
use mesh_runtime::{backoff::Backoff, shutdown::Shutdown};
use tokio::{sync::watch, time::Instant};

use super::{Hub, Reads, topics::Topics, trust::Decision};

/// Shortest and longest pause after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One kind of watched data: how to read it and what an answer means.
pub(crate) trait Source: Send + Sync + 'static {
    /// What Consul answers.
    type Value: Send;
    /// What subscribers see.
    type View: Default + Send + Sync + 'static;
    /// For logs: `service` or `catalog`.
    const KIND: &'static str;
    /// Whether the loop counts in `mesh_bridge_watches`.
    const COUNTED: bool;

    /// The key of this loop's channel.
    fn key(&self) -> &str;
    /// Where this kind's channels live.
    fn topics(hub: &Hub) -> &Topics<Self::View>;
    /// One read.
    fn fetch<'a>(
        &'a self,
        client: &'a Client,
        opts: QueryOptions,
    ) -> impl Future<Output = Result<QueryResult<Self::Value>, Error>> + Send + 'a;
    /// What to do with `value` given what is known; the new view to publish
    /// when the decision is [`Decision::Apply`].
    fn judge(
        &self,
        current: &Self::View,
        value: Self::Value,
        known_leader: bool,
    ) -> (Decision, Self::View);
}

/// Index bookkeeping of one loop.
#[derive(Debug)]
pub(crate) struct BlockingQuery {
    index: u64,
    wait: Duration,
    stale: bool,
    backoff: Backoff,
}

// === impl BlockingQuery ===

impl BlockingQuery {
    pub(crate) fn new(reads: Reads) -> Self {
        Self {
            index: 0,
            wait: reads.wait,
            stale: reads.stale,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
        }
    }

    /// The options of the next read.
    pub(crate) fn options(&self) -> QueryOptions {
        let opts = QueryOptions::blocking(self.index, self.wait);
        if self.stale { opts.stale() } else { opts }
    }

    /// Takes the index of an answer; returns a pause when Consul keeps
    /// answering with no usable index (reading at once would spin).
    pub(crate) fn answered(&mut self, returned: u64) -> Option<Duration> {
        let sent = self.index;
        self.index = next_index(sent, returned);
        if sent == 0 && self.index == 0 {
            return Some(self.backoff.next_delay());
        }
        self.backoff.reset();
        None
    }

    /// The pause after a failed or untrusted read; the index is kept.
    pub(crate) fn failed(&mut self) -> Duration {
        self.backoff.next_delay()
    }
}

/// The index for the next read: the returned one, or 0 (a fresh read)
/// when it went backwards or is 0.
pub(crate) fn next_index(sent: u64, returned: u64) -> u64 {
    if returned == 0 || returned < sent {
        0
    } else {
        returned
    }
}

/// Runs the loop of `source`, publishing on `tx`, until shutdown or until
/// nobody receives anymore.
pub(crate) async fn run<S: Source>(source: &S, tx: watch::Sender<S::View>, hub: &Hub) {
    let mut query = BlockingQuery::new(hub.reads);
    let mut shutdown = hub.shutdown.clone();
    let mut failing = false;
    loop {
        let opts = query.options();
        let started = Instant::now();
        let Some(result) = next_answer(source, &tx, hub, opts, &mut shutdown).await else {
            return;
        };
        hub.metrics.consul_call(&result);
        hub.set_reachable(result.is_ok());
        let pause = match result {
            Ok(answer) => {
                if opts.is_blocking() {
                    hub.metrics.blocking_query(started.elapsed());
                }
                if std::mem::take(&mut failing) {
                    tracing::info!("Consul answers again");
                }
                apply(source, &tx, hub, &mut query, answer)
            }
            Err(e) => {
                report_error(&e, &mut failing);
                Some(query.failed())
            }
        };
        if let Some(pause) = pause {
            // A loop that failed retries as soon as another one finds
            // Consul back, instead of waiting out its backoff.
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = hub.recovered(), if failing => {}
                _ = shutdown.requested() => return,
            }
        }
    }
}

/// Consul's next answer; `None` when the loop must stop: shutdown, or the
/// last subscriber left (a read in flight is then dropped).
async fn next_answer<S: Source>(
    source: &S,
    tx: &watch::Sender<S::View>,
    hub: &Hub,
    opts: QueryOptions,
    shutdown: &mut Shutdown,
) -> Option<Result<QueryResult<S::Value>, Error>> {
    loop {
        tokio::select! {
            r = source.fetch(&hub.client, opts) => return Some(r),
            _ = tx.closed() => {
                if S::topics(hub).retire(source.key(), tx) {
                    tracing::debug!("no subscriber left; watch stopped");
                    return None;
                }
            }
            _ = shutdown.requested() => return None,
        }
    }
}

/// Publishes a trusted, changed answer; returns the pause before the next read.
fn apply<S: Source>(
    source: &S,
    tx: &watch::Sender<S::View>,
    hub: &Hub,
    query: &mut BlockingQuery,
    answer: QueryResult<S::Value>,
) -> Option<Duration> {
    let (decision, view) = source.judge(&tx.borrow(), answer.value, answer.known_leader);
    match decision {
        Decision::Untrusted => {
            hub.metrics.untrusted.increment(1);
            tracing::warn!(
                index = answer.index,
                last_contact_ms = answer.last_contact_ms,
                "answer from a server without a leader would shrink the set; ignored"
            );
            // Keep the index: read again soon, until a server with a leader answers.
            Some(query.failed())
        }
        Decision::Unchanged => query.answered(answer.index),
        Decision::Apply => {
            tx.send_replace(view);
            hub.bump();
            tracing::debug!(index = answer.index, "applied");
            query.answered(answer.index)
        }
    }
}

/// Logs the first failure loudly and the ones after it quietly.
fn report_error(e: &Error, failing: &mut bool) {
    if std::mem::replace(failing, true) {
        tracing::debug!(error = %e, "Consul read failed again; keeping the last answer");
    } else {
        tracing::warn!(error = %e, "Consul read failed; keeping the last answer and retrying");
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, sync::Mutex};

    use consul_client::{AgentService, ClientConfig, Node, ServiceEntry};
    use mesh_runtime::{metrics::Registry, shutdown};

    use super::*;
    use crate::{
        metrics::BridgeMetrics,
        watch::{ServiceView, Watches, service::ServiceSource},
    };

    type Answer = Result<QueryResult<Vec<ServiceEntry>>, Error>;

    const READS: Reads = Reads {
        wait: Duration::from_secs(60),
        stale: false,
    };

    /// A service source answering from a script, then never again.
    struct Scripted {
        script: Mutex<VecDeque<Answer>>,
        judge: ServiceSource,
    }

    impl Source for Scripted {
        type Value = Vec<ServiceEntry>;
        type View = ServiceView;
        const KIND: &'static str = "scripted";
        const COUNTED: bool = false;

        fn key(&self) -> &str {
            "web"
        }

        fn topics(hub: &Hub) -> &Topics<ServiceView> {
            &hub.services
        }

        fn fetch<'a>(
            &'a self,
            _: &'a Client,
            _: QueryOptions,
        ) -> impl Future<Output = Answer> + Send + 'a {
            let next = self.script.lock().unwrap().pop_front();
            async move {
                match next {
                    Some(answer) => answer,
                    None => std::future::pending().await,
                }
            }
        }

        fn judge(
            &self,
            current: &ServiceView,
            value: Self::Value,
            leader: bool,
        ) -> (Decision, ServiceView) {
            self.judge.judge(current, value, leader)
        }
    }

    fn answer(ids: &[&str], index: u64, known_leader: bool) -> Answer {
        let entries = ids
            .iter()
            .map(|id| ServiceEntry {
                node: Node {
                    node: "n1".into(),
                    address: "10.0.0.1".into(),
                    ..Default::default()
                },
                service: AgentService {
                    id: id.to_string(),
                    port: 80,
                    ..Default::default()
                },
                checks: Vec::new(),
            })
            .collect();
        Ok(QueryResult {
            value: entries,
            index,
            known_leader,
            last_contact_ms: 0,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn errors_and_untrusted_answers_keep_the_last_set() {
        let registry = Registry::new();
        let (trigger, shutdown) = shutdown::channel();
        let client = Client::new(&ClientConfig::new(["http://127.0.0.1:1"])).unwrap();
        let metrics = BridgeMetrics::new(&registry);
        let watches = Watches::new(client, READS, metrics, shutdown);
        let unreachable = Error::Unreachable {
            addr: "a".into(),
            reason: "down".into(),
        };
        let source = Scripted {
            script: Mutex::new(VecDeque::from([
                answer(&["a", "b"], 5, true),
                Err(unreachable),
                answer(&[], 6, false),
                answer(&["a"], 7, true),
            ])),
            judge: ServiceSource::new("web"),
        };
        let (mut rx, tx) = watches.hub.services.subscribe("web");
        let hub = watches.hub.clone();
        let task = tokio::spawn(async move { run(&source, tx.unwrap(), &hub).await });

        let ids = |v: &ServiceView| {
            v.as_ref()
                .map(|e| e.iter().map(|e| e.id.clone()).collect::<Vec<_>>())
        };
        let last = rx
            .wait_for(|v| ids(v) == Some(vec!["a".into()]))
            .await
            .unwrap();
        drop(last);
        assert_eq!(
            *watches.changes().borrow(),
            2,
            "only the two trusted answers were published"
        );
        assert!(
            registry
                .render()
                .contains("mesh_bridge_untrusted_answers_total 1")
        );
        trigger.trigger();
        task.await.unwrap();
    }

    #[test]
    fn the_index_follows_consul_and_resets_when_it_goes_backwards() {
        assert_eq!(next_index(0, 10), 10);
        assert_eq!(next_index(10, 10), 10, "wait ran out, nothing changed");
        assert_eq!(next_index(10, 12), 12);
        assert_eq!(next_index(12, 5), 0, "went backwards");
        assert_eq!(next_index(12, 0), 0, "zero is never a valid index");
    }

    #[test]
    fn blocking_reads_carry_the_index_and_read_as_configured() {
        let mut q = BlockingQuery::new(Reads {
            stale: true,
            ..READS
        });
        assert!(!q.options().is_blocking(), "the first read answers at once");
        assert_eq!(q.answered(42), None);
        let opts = q.options();
        assert_eq!(
            (opts.index, opts.wait, opts.stale),
            (42, Some(Duration::from_secs(60)), true)
        );
        assert_eq!(q.answered(3), None, "a reset reads again at once");
        assert_eq!(q.options().index, 0);
        assert!(
            !BlockingQuery::new(READS).options().stale,
            "the leader by default"
        );
    }

    #[test]
    fn repeated_zero_indexes_pause_instead_of_spinning() {
        let mut q = BlockingQuery::new(READS);
        let first = q.answered(0).expect("index 0 after index 0 pauses");
        assert!(first <= BACKOFF_MIN);
        let mut last = first;
        for _ in 0..10 {
            last = q.answered(0).expect("still no usable index");
        }
        assert!(last >= BACKOFF_MAX / 2, "{last:?}");
        assert_eq!(q.answered(7), None);
    }

    #[test]
    fn a_failure_keeps_the_index() {
        let mut q = BlockingQuery::new(READS);
        q.answered(9);
        assert!(q.failed() <= BACKOFF_MIN);
        assert_eq!(q.options().index, 9);
    }
}
