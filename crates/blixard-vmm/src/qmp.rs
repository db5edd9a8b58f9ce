//! A minimal QMP (qemu machine protocol) client over a unix socket.
//!
//! One connection per operation: connect, read the greeting, `qmp_capabilities`, run the
//! command, collect the events that arrive interleaved with the reply.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::error::ControlError;

/// Longest QMP line accepted (protects against a runaway peer).
pub const MAX_LINE: usize = 1 << 20;

/// One parsed QMP message.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// The server greeting (`{"QMP": {...}}`).
    Greeting(Value),
    /// A successful reply.
    Return {
        /// The `id` we sent, echoed.
        id: Option<Value>,
        /// The `return` value.
        value: Value,
    },
    /// An error reply.
    Error {
        /// The `id` we sent, echoed.
        id: Option<Value>,
        /// Error class.
        class: String,
        /// Human description.
        desc: String,
    },
    /// An asynchronous event (STOP, RESUME, RESET, POWERDOWN, SHUTDOWN, ...).
    Event {
        /// Event name.
        name: String,
        /// Event data (or null).
        data: Value,
    },
}

/// Parse one line of QMP output. Never panics.
pub fn parse_qmp_line(line: &str) -> Result<QmpMessage, ControlError> {
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| ControlError::Protocol(format!("QMP line is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ControlError::Protocol("QMP line is not a JSON object".into()))?;
    let id = obj.get("id").cloned();
    if let Some(g) = obj.get("QMP") {
        return Ok(QmpMessage::Greeting(g.clone()));
    }
    if let Some(r) = obj.get("return") {
        return Ok(QmpMessage::Return {
            id,
            value: r.clone(),
        });
    }
    if let Some(e) = obj.get("error") {
        let class = e
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("GenericError")
            .to_string();
        let desc = e
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        return Ok(QmpMessage::Error { id, class, desc });
    }
    if let Some(ev) = obj.get("event").and_then(Value::as_str) {
        return Ok(QmpMessage::Event {
            name: ev.to_string(),
            data: obj.get("data").cloned().unwrap_or(Value::Null),
        });
    }
    Err(ControlError::Protocol(
        "QMP object has none of QMP/return/error/event".into(),
    ))
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    timeout: Duration,
    /// Events received so far (name only, in order).
    pub events: Vec<String>,
}

impl QmpClient {
    /// Connect, read the greeting and negotiate capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, ControlError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| ControlError::Timeout {
                what: "connect".into(),
                after: timeout,
            })?
            .map_err(|source| ControlError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut c = QmpClient {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
            timeout,
            events: Vec::new(),
        };
        match c.read_message("greeting").await? {
            QmpMessage::Greeting(_) => {}
            other => {
                return Err(ControlError::Protocol(format!(
                    "expected QMP greeting, got {other:?}"
                )))
            }
        }
        c.execute("qmp_capabilities", None).await?;
        Ok(c)
    }

    async fn read_message(&mut self, what: &str) -> Result<QmpMessage, ControlError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n =
                tokio::time::timeout(self.timeout, read_bounded_line(&mut self.reader, &mut line))
                    .await
                    .map_err(|_| ControlError::Timeout {
                        what: what.to_string(),
                        after: self.timeout,
                    })??;
            if n == 0 {
                return Err(ControlError::Protocol(format!(
                    "QMP socket closed while waiting for {what}"
                )));
            }
            if line.trim().is_empty() {
                continue;
            }
            return parse_qmp_line(&line);
        }
    }

    /// Run a command and return its `return` value. Events seen meanwhile go to `events`.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, ControlError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = serde_json::json!({ "execute": command, "id": id });
        if let (Some(args), Some(obj)) = (arguments, req.as_object_mut()) {
            obj.insert("arguments".into(), args);
        }
        let mut bytes = req.to_string().into_bytes();
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        loop {
            match self.read_message(command).await? {
                QmpMessage::Event { name, .. } => self.events.push(name),
                QmpMessage::Greeting(_) => {}
                QmpMessage::Return { id: rid, value } => {
                    if rid.as_ref().and_then(Value::as_u64).is_none_or(|r| r == id) {
                        return Ok(value);
                    }
                }
                QmpMessage::Error {
                    id: rid,
                    class,
                    desc,
                } => {
                    if rid.as_ref().and_then(Value::as_u64).is_none_or(|r| r == id) {
                        return Err(ControlError::Qmp {
                            command: command.to_string(),
                            class,
                            desc,
                        });
                    }
                }
            }
        }
    }

    /// Wait until an event named `name` arrives (or was already seen).
    pub async fn wait_event(&mut self, name: &str) -> Result<(), ControlError> {
        if self.events.iter().any(|e| e == name) {
            return Ok(());
        }
        loop {
            if let QmpMessage::Event { name: n, .. } = self.read_message(name).await? {
                let hit = n == name;
                self.events.push(n);
                if hit {
                    return Ok(());
                }
            }
        }
    }

    /// `query-status` → (`running`, `status` string).
    pub async fn query_status(&mut self) -> Result<(bool, String), ControlError> {
        let v = self.execute("query-status", None).await?;
        let running = v.get("running").and_then(Value::as_bool).unwrap_or(false);
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
        Ok((running, status))
    }
}

async fn read_bounded_line(
    reader: &mut BufReader<OwnedReadHalf>,
    out: &mut String,
) -> Result<usize, ControlError> {
    let mut buf = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            break;
        }
        let (chunk, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        buf.extend_from_slice(chunk);
        let used = chunk.len();
        reader.consume(used);
        if buf.len() > MAX_LINE {
            return Err(ControlError::Protocol(format!(
                "QMP line longer than {MAX_LINE} bytes"
            )));
        }
        if done {
            break;
        }
    }
    out.push_str(&String::from_utf8_lossy(&buf));
    Ok(buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_message_kinds() {
        assert!(matches!(
            parse_qmp_line(r#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#),
            Ok(QmpMessage::Greeting(_))
        ));
        assert!(matches!(
            parse_qmp_line(r#"{"return": {}, "id": 3}"#),
            Ok(QmpMessage::Return { id: Some(_), .. })
        ));
        match parse_qmp_line(r#"{"error": {"class": "CommandNotFound", "desc": "nope"}}"#) {
            Ok(QmpMessage::Error { class, desc, .. }) => {
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "nope");
            }
            other => panic!("{other:?}"),
        }
        match parse_qmp_line(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#)
        {
            Ok(QmpMessage::Event { name, .. }) => assert_eq!(name, "STOP"),
            other => panic!("{other:?}"),
        }
        assert!(parse_qmp_line("[1,2]").is_err());
        assert!(parse_qmp_line("{}").is_err());
        assert!(parse_qmp_line("not json").is_err());
    }

    #[tokio::test]
    async fn client_against_a_fake_qmp_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .expect("write");
            let mut line = String::new();
            let mut seen = Vec::new();
            while r.read_line(&mut line).await.expect("read") > 0 {
                let v: Value = serde_json::from_str(&line).expect("json");
                let cmd = v["execute"].as_str().unwrap_or("").to_string();
                let id = v["id"].clone();
                seen.push(cmd.clone());
                let reply = match cmd.as_str() {
                    "stop" => format!(
                        "{{\"event\": \"STOP\", \"data\": {{}}}}\r\n{{\"return\": {{}}, \"id\": {id}}}\r\n"
                    ),
                    "query-status" => format!(
                        "{{\"return\": {{\"running\": false, \"status\": \"paused\"}}, \"id\": {id}}}\r\n"
                    ),
                    "bogus" => format!(
                        "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command bogus has not been found\"}}, \"id\": {id}}}\r\n"
                    ),
                    _ => format!("{{\"return\": {{}}, \"id\": {id}}}\r\n"),
                };
                w.write_all(reply.as_bytes()).await.expect("write");
                line.clear();
            }
            seen
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(2))
            .await
            .expect("connect");
        c.execute("stop", None).await.expect("stop");
        assert_eq!(c.events, vec!["STOP".to_string()]);
        c.wait_event("STOP").await.expect("event");
        assert_eq!(
            c.query_status().await.expect("status"),
            (false, "paused".to_string())
        );
        let err = c.execute("bogus", None).await.expect_err("must fail");
        assert!(matches!(err, ControlError::Qmp { .. }), "{err}");
        drop(c);
        let seen = server.await.expect("server");
        assert_eq!(
            seen,
            vec!["qmp_capabilities", "stop", "query-status", "bogus"]
        );
    }

    proptest! {
        #[test]
        fn qmp_parser_never_panics(s in ".{0,300}") {
            let _ = parse_qmp_line(&s);
        }

        #[test]
        fn qmp_parser_never_panics_on_jsonish(
            key in prop::sample::select(vec!["QMP", "return", "error", "event", "id", "data", "x"]),
            val in prop_oneof![Just("null".to_string()), Just("{}".to_string()), Just("[]".to_string()), "[0-9]{1,5}", "\"[a-z]{0,8}\""],
        ) {
            let _ = parse_qmp_line(&format!("{{\"{key}\": {val}}}"));
            let _ = parse_qmp_line(&format!("{{\"error\": {{\"class\": {val}, \"desc\": {val}}}}}"));
        }
    }
}
