//! Dispatch: a batch's records to their tenants' coordinators, in parallel across tenants and
//! in order within one; refusals to the dead letters; the coordinator calls.

use super::*;

impl Engine {
    /// Processes one batch of inputs: every tenant's records in order, tenants in parallel.
    /// With chaos on, the batch is cut so that a node actor dies after every N records.
    pub async fn process(&mut self, mut inputs: Vec<Input>) -> Result<(), EngineError> {
        if self.cfg.chaos_kill_every == 0 {
            return self.process_chunk(inputs).await;
        }
        while !inputs.is_empty() {
            let take = (self.until_chaos as usize).min(inputs.len());
            let rest = inputs.split_off(take);
            self.process_chunk(inputs).await?;
            inputs = rest;
            self.until_chaos -= take as u64;
            if self.until_chaos == 0 {
                self.chaos_kill().await?;
                self.until_chaos = self.cfg.chaos_kill_every;
            }
        }
        Ok(())
    }

    pub(super) async fn process_chunk(&mut self, inputs: Vec<Input>) -> Result<(), EngineError> {
        let n = inputs.len() as u64;
        let mut by_tenant: BTreeMap<String, Vec<(u64, Record)>> = BTreeMap::new();
        let mut refused: Vec<(u64, Refusal)> = Vec::new();
        let mut raw: HashMap<u64, (Vec<u8>, Option<Arc<crate::source::Origin>>)> = HashMap::new();
        let last_tag = inputs.last().map(|i| i.tag);
        let mut skipped = 0u64;
        for inp in inputs {
            let tag = inp.tag;
            // A record read again after a restart that the tenants ahead already applied: only a
            // tenant that is behind takes it (see `Position`).
            let again = self.window.is_some_and(|w| tag <= w);
            match inp.decoded {
                Ok(rec) => {
                    let t = rec.tenant();
                    let take = !self.parked.iter().any(|p| p.tenant == t)
                        && (!again || self.behind.get(t).is_some_and(|b| tag > b.applied));
                    if !take {
                        skipped += 1;
                        continue;
                    }
                    by_tenant.entry(t.to_string()).or_default().push((tag, rec))
                }
                Err(_) if again => {
                    skipped += 1;
                    continue;
                }
                Err(r) => refused.push((tag, r)),
            }
            raw.insert(tag, (inp.raw, inp.origin));
        }
        if skipped > 0 {
            metrics::counter!("canopy_records_skipped_total").increment(skipped);
        }
        // Records that did not decode name no tenant; they count under the empty tenant label.
        let refused_undecoded = refused.len() as u64;
        let mut calls = Vec::with_capacity(by_tenant.len());
        let snap_seq = self.snap_seq;
        for (tenant, recs) in by_tenant {
            metrics::counter!("canopy_records_total", "tenant" => tenant.clone())
                .increment(recs.len() as u64);
            let batch: TaggedBatch = Arc::new(recs);
            let h = self.tenant(&tenant).await?;
            h.log.push((snap_seq, batch.clone()));
            calls.push((tenant, batch));
        }
        let outcomes = self.dispatch(calls).await?;
        for (tenant, mut o) in outcomes {
            // A tenant catching up wrote its dead letters up to `lettered` before it was parked.
            if let Some(b) = self.behind.get(&tenant) {
                o.refused.retain(|(tag, _)| *tag > b.lettered);
            }
            self.stats.accepted.fetch_add(o.accepted, Ordering::Relaxed);
            self.stats
                .duplicates
                .fetch_add(o.duplicates, Ordering::Relaxed);
            metrics::counter!("canopy_duplicates_total").increment(o.duplicates);
            refused.extend(o.refused);
        }
        refused.sort_by_key(|(tag, _)| *tag);
        for (tag, r) in &refused {
            let (bytes, origin) = raw
                .get(tag)
                .map(|(b, o)| (b.as_slice(), o.as_deref()))
                .unwrap_or((&[], None));
            self.dead
                .write(DeadLetter {
                    tag: *tag,
                    backlog: self.window.is_some_and(|w| *tag <= w),
                    origin,
                    refusal: r,
                    raw: bytes,
                })
                .await?;
            metrics::counter!("canopy_dead_letters_total", "reason" => r.reason()).increment(1);
        }
        self.stats
            .refused
            .fetch_add(refused.len() as u64, Ordering::Relaxed);
        self.stats.records.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("canopy_records_total", "tenant" => "").increment(refused_undecoded);
        self.since_checkpoint += n;
        if let Some(t) = last_tag {
            self.through = self.through.max(t);
            if self.window.is_none_or(|w| t >= w) {
                // Past the re-read records: nobody is behind any more but the parked.
                self.behind.clear();
            } else {
                for b in self.behind.values_mut() {
                    b.applied = b.applied.max(t);
                    b.lettered = b.lettered.max(t);
                }
            }
        }
        Ok(())
    }

    /// A coordinator for `tenant`, restored from the store.
    pub(super) async fn spawn(&self, tenant: &str) -> Result<ActorRef<CoordMsg>, TenantError> {
        spawn_tenant(
            tenant,
            self.cfg.tenant,
            self.store.clone(),
            self.snap_seq,
            self.stats.clone(),
            None,
        )
        .await
    }

    pub(super) async fn tenant(&mut self, tenant: &str) -> Result<&mut TenantHandle, EngineError> {
        if !self.tenants.contains_key(tenant) {
            let actor = self
                .spawn(tenant)
                .await
                .map_err(|e| EngineError::Tenant(tenant.into(), e))?;
            self.tenants.insert(
                tenant.to_string(),
                TenantHandle {
                    actor,
                    log: Vec::new(),
                    restarts: 0,
                    pending: 0,
                },
            );
        }
        Ok(self.tenants.get_mut(tenant).expect("just inserted"))
    }

    /// Sends every tenant its batch and collects the outcomes; rebuilds tenants that failed.
    pub(super) async fn dispatch(
        &mut self,
        calls: Vec<(String, TaggedBatch)>,
    ) -> Result<Vec<(String, BatchOutcome)>, EngineError> {
        let mut waits = Vec::with_capacity(calls.len());
        for (tenant, batch) in calls {
            let asked = ask(&self.tenants[&tenant].actor, |reply| CoordMsg::Process {
                batch: batch.clone(),
                reply,
            });
            waits.push((tenant, batch, asked));
        }
        let mut out = Vec::with_capacity(waits.len());
        for (tenant, batch, asked) in waits {
            let o = match answer(asked).await {
                Ok(o) => o,
                Err(e) => self.recover(&tenant, e, Some(batch)).await?,
            };
            if let Some(h) = self.tenants.get_mut(&tenant) {
                h.restarts = 0;
                h.pending = o.pending_events;
            }
            self.interval_events += o.sent_events;
            out.push((tenant, o));
        }
        Ok(out)
    }
}

/// A request sent to a coordinator without waiting for it (`None`: it could not be sent), so
/// that several coordinators work at once; [`answer`] then waits for the reply.
pub(super) type Asked<T> = Option<ractor::concurrency::OneshotReceiver<Result<T, TenantError>>>;

pub(super) fn ask<T>(
    actor: &ActorRef<CoordMsg>,
    f: impl FnOnce(ractor::RpcReplyPort<Result<T, TenantError>>) -> CoordMsg,
) -> Asked<T> {
    let (tx, rx) = oneshot();
    actor.send_message(f(tx.into())).is_ok().then_some(rx)
}

pub(super) async fn answer<T>(asked: Asked<T>) -> Result<T, TenantError> {
    match asked {
        Some(rx) => rx
            .await
            .unwrap_or_else(|_| Err(TenantError::CoordinatorStopped)),
        None => Err(TenantError::CoordinatorUnreachable),
    }
}

pub(super) async fn call<T: Send + 'static>(
    actor: &ActorRef<CoordMsg>,
    f: impl FnOnce(ractor::RpcReplyPort<Result<T, TenantError>>) -> CoordMsg,
) -> Result<T, TenantError> {
    match actor.call(f, None).await {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        _ => Err(TenantError::CoordinatorSilent),
    }
}

pub(super) async fn call_plain<T: Send + 'static>(
    actor: &ActorRef<CoordMsg>,
    f: impl FnOnce(ractor::RpcReplyPort<T>) -> CoordMsg,
) -> Result<T, ()> {
    match actor.call(f, None).await {
        Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
        _ => Err(()),
    }
}
