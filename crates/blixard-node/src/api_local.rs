//! Client requests one particular node answers itself: its own status, pulling an image
//! onto it, gc of its images, a push received from a CLI, and the console of a VM it runs.

use std::collections::BTreeMap;
use std::time::Instant;

use blixard_types::command::Refusal;
use blixard_types::image::validate_image_name;
use blixard_types::rpc::{ApiError, ClientRequest, ClientResponse, GcReport, ImageInfo, LogChunk, PullReport};
use blixard_types::{Command, CommandResult, NodeId};
use tracing::info;

use crate::client_api::node_status;
use crate::node::{refused, NodeCtx};

/// Largest console chunk one request returns.
const MAX_LOG_CHUNK: u32 = 256 * 1024;

pub(crate) async fn handle(ctx: &NodeCtx, caller: NodeId, req: ClientRequest) -> Result<ClientResponse, ApiError> {
    match req {
        ClientRequest::NodeStatus { .. } => Ok(ClientResponse::Node(node_status(ctx))),
        ClientRequest::ImagePull { reference, .. } => {
            let hash = resolve_image(ctx, &reference)?;
            Ok(ClientResponse::Pulled(pull(ctx, &hash).await?))
        }
        ClientRequest::ImageGc { node: Some(_) } => Ok(ClientResponse::Gc(vec![gc_here(ctx).await])),
        ClientRequest::ImageGc { node: None } => Ok(ClientResponse::Gc(gc_everywhere(ctx).await)),
        ClientRequest::ImagePush { hash, name, provider } => push(ctx, caller, hash, name, provider).await,
        ClientRequest::VmLogs { name, offset, max_bytes } => {
            let backend = ctx.backends.find(&name).await.ok_or_else(|| {
                ApiError::Invalid(format!("VM {name:?} has not been created on its node yet (see `blixard vm info {name}`)"))
            })?;
            let c = backend
                .console_log(&name, offset, max_bytes.min(MAX_LOG_CHUNK) as usize)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(ClientResponse::Logs(LogChunk { node: ctx.id, data: c.data, next: c.next, skipped: c.skipped }))
        }
        _ => Err(ApiError::Invalid("not a node-local request".into())),
    }
}

pub(crate) fn resolve_image(ctx: &NodeCtx, reference: &str) -> Result<String, ApiError> {
    let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
    st.state.resolve_image(reference).map_err(refused)
}

/// Fetches an image onto this node from the members that hold it, and materialises it.
async fn pull(ctx: &NodeCtx, hash: &str) -> Result<PullReport, ApiError> {
    let started = Instant::now();
    let providers = crate::images::providers(ctx, hash);
    let r = ctx.images.fetch(hash, providers).await;
    ctx.metrics.observe_fetch(&r);
    let stats = r.map_err(|e| ApiError::Refused(e.to_string()))?;
    ctx.images.materialise(hash).await.map_err(|e| ApiError::Refused(e.to_string()))?;
    let image = image_info(ctx, hash).ok_or_else(|| refused(Refusal::UnknownImage(hash.to_string())))?;
    Ok(PullReport {
        node: ctx.id,
        image,
        bytes_transferred: stats.bytes_transferred,
        parts: stats.parts as u64,
        parts_already_local: stats.parts_already_local as u64,
        elapsed_ms: started.elapsed().as_millis() as u64,
        providers: stats
            .providers
            .iter()
            .filter(|p| p.bytes > 0)
            .map(|p| (blixard_mesh::node_id(&p.id), p.bytes))
            .collect::<BTreeMap<_, _>>(),
    })
}

/// A push: fetch the image from the CLI that sent the request (only from it: a node is not
/// a proxy to arbitrary keys), verify it, then record it in the catalogue.
async fn push(
    ctx: &NodeCtx,
    caller: NodeId,
    hash: String,
    name: Option<String>,
    provider: blixard_types::ticket::PeerAddr,
) -> Result<ClientResponse, ApiError> {
    if provider.id != caller {
        return Err(ApiError::Invalid("a push must be served by the pushing client itself".into()));
    }
    if let Some(n) = &name {
        validate_image_name(n).map_err(ApiError::Invalid)?;
    }
    crate::images::parse_hash(&hash).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let addr = blixard_mesh::endpoint_addr(&provider.id, &provider.addrs)
        .ok_or_else(|| ApiError::Invalid("the provider's key is not a valid key".into()))?;
    let r = ctx.images.fetch(&hash, vec![addr]).await;
    ctx.metrics.observe_fetch(&r);
    let stats = r.map_err(|e| ApiError::Refused(e.to_string()))?;
    let (kind, size) = ctx.images.describe(&hash).await.map_err(|e| ApiError::Refused(e.to_string()))?;
    info!(image = %&hash[..12], bytes = stats.bytes_transferred, %kind, "image received");
    match ctx.propose(caller, Command::PublishImage { hash: hash.clone(), size, kind, name }).await? {
        CommandResult::Ok => {}
        CommandResult::Refused(r) => return Err(refused(r)),
    }
    let image = image_info(ctx, &hash).ok_or_else(|| ApiError::Internal("the image was recorded but is not visible here yet".into()))?;
    Ok(ClientResponse::Image(image))
}

/// Drops the local images the catalogue no longer lists.
async fn gc_here(ctx: &NodeCtx) -> GcReport {
    let catalogue = ctx.state.read().unwrap_or_else(|p| p.into_inner()).state.images.keys().cloned().collect();
    match ctx.images.gc(&catalogue).await {
        Ok(s) => GcReport {
            node: ctx.id,
            images_removed: s.images_removed as u64,
            blobs_before: s.blobs_before as u64,
            blobs_after: s.blobs_after as u64,
            error: None,
        },
        Err(e) => GcReport { node: ctx.id, images_removed: 0, blobs_before: 0, blobs_after: 0, error: Some(e.to_string()) },
    }
}

/// Runs gc on every member (in parallel); a member that cannot be reached gets an error
/// entry.
pub(crate) async fn gc_everywhere(ctx: &NodeCtx) -> Vec<GcReport> {
    let members: Vec<NodeId> = ctx.state.read().unwrap_or_else(|p| p.into_inner()).state.nodes.keys().copied().collect();
    let calls = members.into_iter().map(|id| async move {
        if id == ctx.id {
            return gc_here(ctx).await;
        }
        let req = ClientRequest::Forwarded {
            origin: ctx.id,
            request: Box::new(ClientRequest::ImageGc { node: Some(id.to_string()) }),
            id: crate::node::new_forward_id(),
        };
        let failed = |e: String| GcReport { node: id, images_removed: 0, blobs_before: 0, blobs_after: 0, error: Some(e) };
        match ctx.forward(id, req).await {
            Ok(ClientResponse::Gc(mut v)) if v.len() == 1 => v.remove(0),
            Ok(ClientResponse::Error(e)) => failed(e.to_string()),
            Ok(other) => failed(format!("unexpected answer {other:?}")),
            Err(e) => failed(e.to_string()),
        }
    });
    n0_future::join_all(calls).await
}

/// The catalogue entry of `hash` with the members that hold it (this node's gossip view).
pub(crate) fn image_info(ctx: &NodeCtx, hash: &str) -> Option<ImageInfo> {
    let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
    let rec = st.state.images.get(hash)?;
    let det = ctx.liveness.lock().unwrap_or_else(|p| p.into_inner());
    let nodes = st
        .state
        .nodes
        .keys()
        .filter(|id| {
            if **id == ctx.id {
                ctx.images.holds(hash)
            } else {
                ctx.is_alive_locked(&det, id) && det.report(id).is_some_and(|r| r.images.iter().any(|i| i == hash))
            }
        })
        .copied()
        .collect();
    Some(ImageInfo {
        hash: hash.to_string(),
        names: rec.names.iter().cloned().collect(),
        kind: rec.kind.to_string(),
        size: rec.size,
        publisher: rec.publisher,
        created_at_ms: rec.created_at_ms,
        nodes,
        vms: st.state.vms_using_image(hash).cloned().collect(),
    })
}
