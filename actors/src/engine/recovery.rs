//! Recovery: rebuilding a tenant whose actor tree broke from its checkpoint and replaying its
//! records since, and parking it when rebuilds keep failing (ARCHITECTURE.md, "Parking").

use super::dispatch::call;
use super::*;

impl Engine {
    /// Rebuilds a tenant from its last checkpoint and replays what it processed since; then, if
    /// given, processes `retry` afresh and returns its outcome.
    pub(super) async fn recover(
        &mut self,
        tenant: &str,
        mut err: TenantError,
        retry: Option<TaggedBatch>,
    ) -> Result<BatchOutcome, EngineError> {
        // The rebuilt tenant loads the store: let a checkpoint still being written land first, so
        // that the log entries it covers can be told apart from those to replay.
        self.await_commit().await?;
        loop {
            let h = self.tenants.get_mut(tenant).expect("known tenant");
            h.restarts += 1;
            if h.restarts > self.cfg.max_restarts {
                let restarts = h.restarts;
                self.park(tenant, restarts, err.to_string(), retry.as_ref());
                return Ok(BatchOutcome::default());
            }
            self.stats.tenant_restarts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("canopy_actor_restarts_total", "kind" => "tenant").increment(1);
            warn!(tenant, error = %err, attempt = h.restarts, "rebuilding tenant from its last checkpoint");
            h.actor.stop(Some("rebuild".into()));
            if h.restarts > 1 {
                // The last rebuild failed too: give a failing dependency (the store) time.
                let ms = self
                    .cfg
                    .retry_initial_ms
                    .saturating_mul(1 << (h.restarts - 2).min(16))
                    .min(self.cfg.retry_max_ms);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let actor = match self.spawn(tenant).await {
                Ok(a) => a,
                Err(e) => {
                    // Counts as a failed rebuild: retried, and parked past the limit.
                    err = e;
                    continue;
                }
            };
            let h = self.tenants.get_mut(tenant).expect("known tenant");
            h.actor = actor.clone();
            // The log ends with `retry` when a batch failed: replay everything before it quietly.
            let mut replay: Vec<TaggedBatch> = h.log.iter().map(|(_, b)| b.clone()).collect();
            if let (Some(r), Some(last)) = (&retry, replay.last()) {
                if Arc::ptr_eq(r, last) {
                    replay.pop();
                }
            }
            let mut failed = None;
            for b in replay.into_iter().chain(retry.clone()) {
                match call(&actor, |reply| CoordMsg::Process {
                    batch: b.clone(),
                    reply,
                })
                .await
                {
                    Ok(o) => {
                        if retry.as_ref().is_some_and(|r| Arc::ptr_eq(r, &b)) {
                            return Ok(o);
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                Some(e) => err = e,
                None => return Ok(BatchOutcome::default()),
            }
        }
    }

    /// Kills a random node actor: half the time by `kill` (the task is aborted), half the time
    /// by a panic inside its handler. Half the kills are then waited for, so that the node is
    /// restarted alone; the others land whenever they land, possibly while the next batch's
    /// round runs, which rebuilds the tenant instead. Both must keep the numbers exact.
    /// Parks a tenant that keeps failing: stops it and skips its records from now on, while the
    /// stored source position stays where its state is durable, so nothing of it is lost.
    pub(super) fn park(
        &mut self,
        tenant: &str,
        restarts: u32,
        error: String,
        failed: Option<&TaggedBatch>,
    ) {
        let Some(h) = self.tenants.remove(tenant) else {
            return;
        };
        h.actor.stop(Some("parked".into()));
        let applied = self
            .committed
            .behind
            .get(tenant)
            .map_or(self.committed.through, |b| b.applied);
        // Dead letters were written for every batch it completed (all but the failed one).
        let done = h
            .log
            .iter()
            .filter(|(_, b)| failed.is_none_or(|f| !Arc::ptr_eq(f, b)))
            .filter_map(|(_, b)| b.last().map(|(tag, _)| *tag))
            .max()
            .unwrap_or(0);
        let was = self.behind.remove(tenant).unwrap_or_default();
        let lettered = applied.max(done).max(was.lettered);
        let error = format!("{restarts} rebuilds failed in a row; last: {error}");
        tracing::error!(tenant, error = %error, applied, "tenant parked: its records are skipped and kept for a retry; the other tenants go on");
        metrics::counter!("canopy_tenants_parked_total").increment(1);
        self.parked.push(Parked {
            tenant: tenant.to_string(),
            error,
            from: self.committed.source.clone(),
            behind: Behind { applied, lettered },
        });
        metrics::gauge!("canopy_tenants_parked").set(self.parked.len() as f64);
    }
}
