//! The accept-side gate. Every protocol except join is wrapped in a [`Gate`] that checks
//! the remote key against the cluster's authorisation (members, or clients for the client
//! API) before the protocol sees the connection.

use std::fmt;
use std::sync::Arc;

use blixard_types::NodeId;
use iroh::endpoint::{Connection, VarInt};
use iroh::protocol::{AcceptError, ProtocolHandler};
use tracing::warn;

use crate::rpc::CLOSE_UNAUTHORIZED;

/// Decides whether a key may use a protocol.
pub type Authorizer = Arc<dyn Fn(&NodeId) -> bool + Send + Sync>;

/// Wraps a protocol handler with a key check.
#[derive(Clone)]
pub struct Gate<H> {
    name: &'static str,
    allow: Authorizer,
    inner: H,
}

impl<H> Gate<H> {
    pub fn new(name: &'static str, allow: Authorizer, inner: H) -> Self {
        Self { name, allow, inner }
    }
}

impl<H: fmt::Debug> fmt::Debug for Gate<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate").field("name", &self.name).field("inner", &self.inner).finish()
    }
}

impl<H: ProtocolHandler> ProtocolHandler for Gate<H> {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let key = crate::node_id(&conn.remote_id());
        if !(self.allow)(&key) {
            warn!(protocol = self.name, peer = %key.short(), "refused connection from unauthorised key");
            crate::rpc::counters::REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            conn.close(VarInt::from_u32(CLOSE_UNAUTHORIZED), b"key not authorised by this cluster");
            // Give the close frame a moment to leave before the connection is dropped.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(200), conn.closed()).await;
            return Ok(());
        }
        crate::rpc::counters::ACCEPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.accept(conn).await
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}
