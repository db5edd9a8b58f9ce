//! Client requests the leader answers: the image catalogue and the VM lifecycle. Writes go
//! through Raft; reads confirm leadership first, so they are linearizable.

use blixard_types::command::Refusal;
use blixard_types::rpc::{ApiError, ClientRequest, ClientResponse, VmInfo};
use blixard_types::vm::HealthCheck;
use blixard_types::{Command, NodeId};

use crate::api_local::{gc_everywhere, image_info, resolve_image};
use crate::client_api::{linearizable, resolve, write};
use crate::node::{refused, NodeCtx};

pub(crate) async fn handle(ctx: &NodeCtx, caller: NodeId, req: ClientRequest) -> Result<ClientResponse, ApiError> {
    match req {
        ClientRequest::ImageList => {
            linearizable(ctx).await?;
            let hashes: Vec<String> = ctx.state.read().unwrap_or_else(|p| p.into_inner()).state.images.keys().cloned().collect();
            Ok(ClientResponse::Images(hashes.iter().filter_map(|h| image_info(ctx, h)).collect()))
        }
        ClientRequest::ImageInfo { reference } => {
            linearizable(ctx).await?;
            let hash = resolve_image(ctx, &reference)?;
            image_info(ctx, &hash).map(ClientResponse::Image).ok_or_else(|| refused(Refusal::UnknownImage(reference)))
        }
        ClientRequest::ImageRemove { reference } => {
            let hash = resolve_image(ctx, &reference)?;
            match write(ctx, caller, Command::RemoveImage { hash }).await? {
                // Every node drops its copy now (one that is down does at its next gc).
                ClientResponse::Ok => Ok(ClientResponse::Gc(gc_everywhere(ctx).await)),
                other => Ok(other),
            }
        }
        ClientRequest::VmCreate { spec, start } => {
            spec.validate().map_err(|e| ApiError::Invalid(e.to_string()))?;
            if matches!(spec.health, Some(HealthCheck::Tcp(_) | HealthCheck::Http { .. })) {
                return Err(ApiError::Invalid(
                    "tcp: and http: health checks need VM networking, which Blixard nodes do not set up yet; use console:TEXT".into(),
                ));
            }
            write(ctx, caller, Command::CreateVm { spec, start }).await
        }
        ClientRequest::VmSetDesired { name, desired } => write(ctx, caller, Command::SetDesired { name, desired }).await,
        ClientRequest::VmReboot { name } => write(ctx, caller, Command::RebootVm { name }).await,
        ClientRequest::VmDelete { name } => write(ctx, caller, Command::DeleteVm { name }).await,
        ClientRequest::VmInfo { name } => {
            linearizable(ctx).await?;
            let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
            let v = st.state.vms.get(&name).ok_or_else(|| refused(Refusal::UnknownVm(name.clone())))?;
            Ok(ClientResponse::Vm(vm_info(&name, v)))
        }
        ClientRequest::VmList => {
            linearizable(ctx).await?;
            let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
            Ok(ClientResponse::Vms(st.state.vms.iter().map(|(n, v)| vm_info(n, v)).collect()))
        }
        ClientRequest::NodeDrain { node, drain } => {
            let node = resolve(ctx, &node)?;
            write(ctx, caller, Command::SetDrain { node, drain }).await
        }
        _ => Err(ApiError::Invalid("nested forwarding".into())),
    }
}

fn vm_info(name: &str, v: &blixard_state::VmRecord) -> VmInfo {
    VmInfo {
        name: name.to_string(),
        image: v.image_ref.clone(),
        image_hash: v.spec.image.clone(),
        state: v.state.to_string(),
        desired: if v.deleting { "deleted".to_string() } else { v.desired.to_string() },
        node: v.node,
        vcpus: v.spec.vcpus,
        memory_mib: v.spec.memory_mib,
        disk_gib: v.spec.disk_gib,
        healthy: v.healthy,
        error: v.error.clone(),
        restarts: v.restarts,
        restart: v.spec.restart.to_string(),
        health_check: v.spec.health.as_ref().map(|h| match h {
            HealthCheck::Console(t) => format!("console:{t}"),
            HealthCheck::Tcp(p) => format!("tcp:{p}"),
            HealthCheck::Http { port, path } => format!("http:{port}{path}"),
        }),
        labels: v.spec.labels.clone(),
        constraints: v.spec.constraints.clone(),
        anti_affinity: v.spec.anti_affinity.clone(),
        deleting: v.deleting,
        created_at_ms: v.created_at_ms,
        since: v.since_ms,
    }
}
