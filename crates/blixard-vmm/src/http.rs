//! Just enough HTTP/1.x for health checks (GET over TCP) and for the Cloud Hypervisor and
//! Firecracker APIs (over unix sockets): one request per connection, `Content-Length`
//! bodies, no chunked encoding.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest response we read.
pub const MAX_RESPONSE: usize = 256 * 1024;

/// A parsed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order (names as sent).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a response could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpParseError {
    /// Bad status line.
    #[error("bad HTTP status line: {0}")]
    StatusLine(String),
    /// Bad header.
    #[error("bad HTTP header line: {0}")]
    Header(String),
    /// Unsupported framing.
    #[error("unsupported HTTP framing: {0}")]
    Unsupported(String),
    /// Too large.
    #[error("HTTP response larger than {MAX_RESPONSE} bytes")]
    TooLarge,
}

/// Parse a response from `buf`. `Ok(None)` = need more bytes; `eof` says no more will come
/// (then a body without `Content-Length` ends at EOF). Never panics.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<HttpResponse>, HttpParseError> {
    if buf.len() > MAX_RESPONSE {
        return Err(HttpParseError::TooLarge);
    }
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if eof {
            return Err(HttpParseError::StatusLine(
                "connection closed before the end of the headers".into(),
            ));
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(HttpParseError::StatusLine(truncate(status_line)));
    }
    let status = parts
        .next()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| HttpParseError::StatusLine(truncate(status_line)))?;
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| HttpParseError::Header(truncate(line)))?;
        if k.is_empty() || k.contains(' ') {
            return Err(HttpParseError::Header(truncate(line)));
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    let mut resp = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(te) = resp.header("transfer-encoding") {
        if !te.eq_ignore_ascii_case("identity") {
            return Err(HttpParseError::Unsupported(format!(
                "transfer-encoding {}",
                truncate(te)
            )));
        }
    }
    let body = &buf[head_end + 4..];
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    match resp.header("content-length") {
        _ if no_body => {}
        Some(cl) => {
            let len: usize = cl
                .parse()
                .map_err(|_| HttpParseError::Header(format!("content-length {}", truncate(cl))))?;
            if len > MAX_RESPONSE {
                return Err(HttpParseError::TooLarge);
            }
            if body.len() < len {
                if eof {
                    return Err(HttpParseError::Unsupported(
                        "connection closed before the end of the body".into(),
                    ));
                }
                return Ok(None);
            }
            resp.body = body[..len].to_vec();
        }
        None => {
            if !eof {
                return Ok(None);
            }
            resp.body = body.to_vec();
        }
    }
    Ok(Some(resp))
}

fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Errors of [`request`].
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Parse.
    #[error("{0}")]
    Parse(#[from] HttpParseError),
    /// Timeout.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
}

/// Send one request on `stream` and read the response.
pub async fn request<S>(
    stream: &mut S,
    method: &str,
    host: &str,
    path: &str,
    body: Option<&str>,
    http10: bool,
    timeout: Duration,
) -> Result<HttpResponse, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let fut = async {
        let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut req = format!(
            "{method} {path} {version}\r\nHost: {host}\r\nUser-Agent: blixard-vmm\r\nConnection: close\r\nAccept: */*\r\n"
        );
        if let Some(b) = body {
            req.push_str("Content-Type: application/json\r\n");
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        } else if method != "GET" {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = stream.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            if let Some(resp) = parse_response(&buf, n == 0)? {
                return Ok(resp);
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_responses() {
        let r = parse_response(b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n", false)
            .expect("ok")
            .expect("complete");
        assert_eq!(r.status, 204);
        assert_eq!(r.header("server"), Some("x"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello world",
            false,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!(r.body, b"hello");
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", false),
            Ok(None)
        );
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n", false), Ok(None));
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nuntil eof", true)
            .expect("ok")
            .expect("complete");
        assert_eq!(r.body, b"until eof");
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n", false).is_err());
        assert!(parse_response(b"HTTP/1.1 999 X\r\n\r\n", false).is_err());
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false
        )
        .is_err());
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400), eof in any::<bool>()) {
            let _ = parse_response(&bytes, eof);
        }

        #[test]
        fn parser_never_panics_on_httpish(
            status in "[0-9]{0,4}",
            headers in prop::collection::vec(("[A-Za-z-]{0,12}", "[ -~]{0,20}"), 0..5),
            body in "[ -~]{0,40}",
            eof in any::<bool>(),
        ) {
            let mut s = format!("HTTP/1.1 {status} X\r\n");
            for (k, v) in headers { s.push_str(&format!("{k}: {v}\r\n")); }
            s.push_str("\r\n");
            s.push_str(&body);
            if let Ok(Some(r)) = parse_response(s.as_bytes(), eof) {
                prop_assert!((100..=599).contains(&r.status));
            }
        }
    }
}
