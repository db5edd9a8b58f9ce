//! The client side of the client API, used by the CLI: reach the cluster named by a
//! ticket, authorise this key with the ticket on first use, and send requests.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use blixard_mesh::rpc::{Pool, RpcError};
use blixard_mesh::{alpn, endpoint};
use blixard_types::rpc::{ApiError, ClientRequest, ClientResponse, JoinRequest, JoinResponse};
use blixard_types::{Role, Ticket};
use iroh::{Endpoint, SecretKey};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for one member to connect before also trying the next.
const CONNECT_STAGGER: Duration = Duration::from_millis(150);
/// How long a request is retried while the cluster has no leader.
const NO_LEADER_RETRY: Duration = Duration::from_secs(10);
/// How long to wait for any member to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("this is a {0} ticket; the CLI needs a client ticket (`blixard cluster ticket --role client`)")]
    NotAClientTicket(Role),
    #[error(transparent)]
    Bind(#[from] endpoint::BindError),
    #[error("no node of the cluster could be reached: {0}")]
    Unreachable(String),
    #[error("the cluster refused this CLI's key: {0}")]
    Refused(String),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("unexpected answer from the cluster: {0}")]
    Unexpected(String),
}

/// A connection to a cluster.
#[derive(Debug)]
pub struct Client {
    endpoint: Endpoint,
    ticket: Ticket,
    api: Pool,
}

impl Client {
    /// Binds a client endpoint with `key` for the cluster of `ticket`.
    pub async fn new(key: SecretKey, ticket: Ticket) -> Result<Self, ClientError> {
        if ticket.role != Role::Client {
            return Err(ClientError::NotAClientTicket(ticket.role));
        }
        let endpoint = endpoint::bind(endpoint::EndpointOptions {
            secret_key: key,
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            relay: None,
            alpns: vec![],
            lookup: None,
        })
        .await?;
        let api = Pool::new(endpoint.clone(), alpn::CLIENT);
        Ok(Self { endpoint, ticket, api })
    }

    /// Sends `req` to the first member that answers; authorises this key with the ticket
    /// if the cluster does not know it yet.
    pub async fn request(&self, req: &ClientRequest) -> Result<ClientResponse, ClientError> {
        self.request_timeout(req, REQUEST_TIMEOUT).await
    }

    /// [`Self::request`] for requests that take long (a push waits for the whole upload).
    pub async fn request_timeout(&self, req: &ClientRequest, timeout: Duration) -> Result<ClientResponse, ClientError> {
        self.request_as(rand::random::<u128>().max(1), req, timeout).await
    }

    /// Sends `req` under the request id `id` (see `ClientRequest::WithId`): sent again
    /// under the same id, its writes are not carried out again.
    pub async fn request_as(&self, id: u128, req: &ClientRequest, timeout: Duration) -> Result<ClientResponse, ClientError> {
        // "No leader" means the request was not carried out (an election is under way):
        // ask again for a few seconds before giving up. Every attempt carries the same id,
        // so a write that did get through somewhere is not carried out twice.
        let req = &ClientRequest::WithId { id, request: Box::new(req.clone()) };
        let deadline = tokio::time::Instant::now() + NO_LEADER_RETRY;
        loop {
            let r = match self.try_peers(req, timeout).await {
                Err(ClientError::Refused(_)) => {
                    self.authorize().await?;
                    self.try_peers(req, timeout).await
                }
                other => other,
            };
            match r {
                Err(ClientError::Api(ApiError::NoLeader)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    /// Sends `req` once, on a connection to whichever ticket member connects first.
    async fn send<Req: serde::Serialize + Sync, Resp: serde::de::DeserializeOwned>(
        &self,
        pool: &Pool,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let peers: Vec<_> = self.ticket.peers.iter().map(|p| (p.id, p.addrs.clone())).collect();
        let (peer, conn) = pool
            .connect_any(&peers, CONNECT_STAGGER, CONNECT_TIMEOUT)
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        pool.call_conn(peer, &conn, req, timeout).await.map_err(|e| match e {
            RpcError::Refused { reason, .. } => ClientError::Refused(reason),
            other => ClientError::Unreachable(other.to_string()),
        })
    }

    async fn try_peers(&self, req: &ClientRequest, timeout: Duration) -> Result<ClientResponse, ClientError> {
        match self.send(&self.api, req, timeout).await? {
            ClientResponse::Error(e) => Err(e.into()),
            r => Ok(r),
        }
    }

    async fn authorize(&self) -> Result<(), ClientError> {
        let pool = Pool::new(self.endpoint.clone(), alpn::JOIN);
        let req = JoinRequest::Client { ticket: self.ticket.clone() };
        match self.send(&pool, &req, REQUEST_TIMEOUT).await? {
            JoinResponse::Authorized { .. } => Ok(()),
            JoinResponse::Refused(reason) => Err(ClientError::Refused(reason)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The CLI's endpoint (a push serves the image's blobs on it).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Addresses a cluster member can dial this endpoint on (loopback included when bound
    /// to all interfaces, so a node on the same host always can).
    pub fn dialable_addrs(&self) -> Vec<SocketAddr> {
        let mut v = endpoint::dialable_addrs(&self.endpoint);
        v.extend(
            self.endpoint
                .bound_sockets()
                .into_iter()
                .filter(|s| s.ip().is_unspecified() && s.is_ipv4())
                .map(|s| SocketAddr::from((Ipv4Addr::LOCALHOST, s.port()))),
        );
        v.sort();
        v.dedup();
        v
    }

    /// Closes the endpoint (lets the peer know at once instead of timing out). Bounded: a
    /// dial still pending to a dead member would otherwise hold the close for seconds.
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_millis(100), self.endpoint.close()).await;
    }
}
