//! Blixard's domain and wire types: identifiers, tickets, state-machine commands and the
//! request/response messages of every protocol. No I/O, no async.
//!
//! Layout:
//! - [`id`]: `NodeId`, `ClusterId`, durations as milliseconds.
//! - [`ticket`]: join/client tickets and their versioned, checksummed string form.
//! - [`command`]: what the replicated state machine applies, and what it answers.
//! - [`image`]: image kinds, names and hash references of the catalogue.
//! - [`rpc`]: messages of the join and client-API protocols.
//! - [`frame`]: length-prefixed postcard framing shared by every protocol.

pub mod command;
pub mod frame;
pub mod gossip;
pub mod id;
pub mod image;
pub mod rpc;
pub mod ticket;
pub mod vm;

pub use command::{Command, CommandResult, Request, Response};
pub use id::{ClusterId, NodeId, NodeIdParseError};
pub use ticket::{Role, Ticket, TicketDecodeError};
