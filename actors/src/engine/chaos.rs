//! Chaos: killing node actors on purpose (`chaos_kill_every`), and the test hooks that read a
//! node's live state or kill a named one.

use super::dispatch::{call, call_plain};
use super::*;

impl Engine {
    pub(super) async fn chaos_kill(&mut self) -> Result<(), EngineError> {
        let names: Vec<String> = self.tenants.keys().cloned().collect();
        if names.is_empty() {
            return Ok(());
        }
        let tenant = names[rand::random_range(0..names.len())].clone();
        let actor = self.tenants[&tenant].actor.clone();
        if let Ok(Some(node)) = call_plain(&actor, CoordMsg::RandomNode).await {
            self.stats.chaos_kills.fetch_add(1, Ordering::Relaxed);
            info!(tenant = %tenant, "chaos: killing a node actor");
            self.kill(
                &tenant,
                node,
                rand::random_bool(0.5),
                rand::random_bool(0.5),
            )
            .await?;
        }
        Ok(())
    }

    pub(super) async fn kill(
        &mut self,
        tenant: &str,
        node: ActorRef<NodeMsg>,
        panic: bool,
        wait: bool,
    ) -> Result<(), EngineError> {
        let id = node.get_id();
        if panic {
            let _ = node.send_message(NodeMsg::Crash);
        } else {
            node.kill();
        }
        if wait {
            let actor = self.tenants[tenant].actor.clone();
            if let Err(e) = call(&actor, |reply| CoordMsg::AwaitDown { id, reply }).await {
                self.recover(tenant, e, None).await?;
            }
        }
        Ok(())
    }

    /// Kills one node actor (by panic or abort) and waits until its tenant dealt with it:
    /// restarted the node, or, past the restart intensity limit, rebuilt the tenant. For tests.
    #[cfg(feature = "test-hooks")]
    pub async fn kill_node(
        &mut self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
        panic: bool,
    ) -> Result<(), EngineError> {
        let Some(h) = self.tenants.get(tenant) else {
            return Ok(());
        };
        let actor = h.actor.clone();
        let found = call_plain(&actor, |reply| CoordMsg::NodeRef {
            hierarchy: hierarchy.into(),
            node: node.into(),
            reply,
        })
        .await
        .ok()
        .flatten();
        match found {
            Some(n) => self.kill(tenant, n, panic, true).await,
            None => Ok(()),
        }
    }

    /// The live state of one node, for tests (settled: every round completes before a reply).
    #[cfg(feature = "test-hooks")]
    pub async fn node_state(
        &mut self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
    ) -> Option<crate::node::NodeState> {
        let actor = self.tenants.get(tenant)?.actor.clone();
        call_plain(&actor, |reply| CoordMsg::NodeState {
            hierarchy: hierarchy.into(),
            node: node.into(),
            reply,
        })
        .await
        .ok()
        .flatten()
    }
}
