//! A small HTTP/1.1 client for the API socket: one request per
//! connection, `Content-Length` or chunked answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens: the VM is not running (or its process died).
    #[error("cannot reach the VM's API at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM's API connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VM's API sent a malformed answer: {0}")]
    Protocol(String),
}

/// An answer: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// The `error` message of a failed request.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<crate::ErrorBody>(&self.body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// The API of one VM.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: &Path) -> Self {
        Client {
            path: path.to_path_buf(),
            timeout: Duration::from_secs(60),
        }
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        let stream = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: self.path.clone(),
            source,
        })?;
        stream.set_write_timeout(Some(self.timeout))?;
        Ok(stream)
    }

    fn send(&self, method: &str, path: &str, body: &[u8]) -> Result<UnixStream, ClientError> {
        let mut stream = self.connect()?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: hostvisor\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        stream.write_all(body)?;
        stream.flush()?;
        Ok(stream)
    }

    /// Sends a request and reads the whole answer.
    pub fn request(&self, method: &str, path: &str, body: &str) -> Result<Response, ClientError> {
        self.request_bytes(method, path, body.as_bytes())
    }

    /// As [`Client::request`], with any bytes as the body.
    pub fn request_bytes(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Response, ClientError> {
        let stream = self.send(method, path, body)?;
        stream.set_read_timeout(Some(self.timeout))?;
        let (status, mut reader) = read_head(stream)?;
        let mut body = Vec::new();
        reader.read_to_end(&mut body)?;
        Ok(Response { status, body })
    }

    /// `PUT /vm/snapshot`: the VMM pauses the VM, writes its running state
    /// into `dir`, makes each disk's new top overlay (`overlays`, one per
    /// disk in the definition's order) backed by its current image and
    /// switches the disk to it, then resumes; 204 on success. Saving a
    /// large guest takes a while: this request waits up to 10 minutes.
    pub fn snapshot(&self, dir: &Path, overlays: &[PathBuf]) -> Result<Response, ClientError> {
        let body = serde_json::json!({ "dir": dir, "overlays": overlays }).to_string();
        let slow = Client {
            path: self.path.clone(),
            timeout: Duration::from_secs(600),
        };
        slow.request("PUT", "/vm/snapshot", &body)
    }

    /// A managed-snapshot request (`/vm/snapshots/...`): these wait up
    /// to 10 minutes (a take writes guest RAM, a delete merges layers).
    pub fn slow_request(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<Response, ClientError> {
        let slow = Client {
            path: self.path.clone(),
            timeout: Duration::from_secs(600),
        };
        slow.request(method, path, body)
    }

    /// Sends a request whose answer is a stream (the console): returns the
    /// status and a reader of the body as it arrives.
    pub fn stream(&self, path: &str) -> Result<(u16, Box<dyn Read + Send>), ClientError> {
        let stream = self.send("GET", path, b"")?;
        read_head(stream)
    }
}

/// Reads the status line and headers; returns the status and a reader of
/// the body (de-chunked when needed).
fn read_head(stream: UnixStream) -> Result<(u16, Box<dyn Read + Send>), ClientError> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| ClientError::Protocol(format!("status line {line:?}")))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Protocol("the headers end early".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => {
                    length =
                        Some(value.parse::<u64>().map_err(|_| {
                            ClientError::Protocol(format!("Content-Length {value:?}"))
                        })?)
                }
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
    }
    Ok((
        status,
        if chunked {
            Box::new(Chunked {
                inner: reader,
                left: 0,
                done: false,
            })
        } else if let Some(n) = length {
            Box::new(reader.take(n))
        } else {
            Box::new(reader)
        },
    ))
}

/// Decodes `Transfer-Encoding: chunked`.
struct Chunked<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            if line.trim().is_empty() {
                // The CRLF after the previous chunk.
                line.clear();
                self.inner.read_line(&mut line)?;
            }
            let size = line.trim().split(';').next().unwrap_or("");
            if size.is_empty() {
                self.done = true;
                return Ok(0);
            }
            self.left = u64::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(bad("the stream ended inside a chunk"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_decoded() {
        let raw = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
        let mut c = Chunked {
            inner: &raw[..],
            left: 0,
            done: false,
        };
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap_or_default();
        assert_eq!(out, "hello world");
    }
}
