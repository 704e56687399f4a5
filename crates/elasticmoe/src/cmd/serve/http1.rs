//! HTTP/1.1 request framing without I/O: where a request head ends, what it says, how long its
//! body is, and the chunked-body decoder.
//!
//! The connection driver ([`super::connections`]) feeds bytes in and gets decisions out, so every
//! limit here (head bytes, request-target length, header count, body bytes) is checked on plain
//! byte slices and unit-tested without sockets. Every refusal is a [`FramingError`] with the HTTP
//! status it earns (400, 413, 414 or 431); the driver answers it with an OpenAI error body and
//! closes the connection.

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Version};

/// The size limits of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramingLimits {
    /// Bytes of the request line and headers together (431 beyond).
    pub max_head_bytes: usize,
    /// Bytes of the request target (414 beyond).
    pub max_uri_bytes: usize,
    /// Header fields (431 beyond).
    pub max_headers: usize,
    /// Bytes of the body (413 beyond).
    pub max_body_bytes: usize,
}

impl Default for FramingLimits {
    fn default() -> Self {
        FramingLimits {
            max_head_bytes: 32 * 1024,
            max_uri_bytes: 8 * 1024,
            max_headers: 100,
            max_body_bytes: 2 * 1024 * 1024,
        }
    }
}

/// Why a request cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FramingError {
    /// The head is longer than the limit, or has too many fields.
    #[error("the request head is over {limit} bytes or {fields} header fields; send fewer or shorter headers")]
    HeadTooLarge {
        /// The byte limit.
        limit: usize,
        /// The field limit.
        fields: usize,
    },
    /// The request target is longer than the limit.
    #[error("the request target is over {limit} bytes; shorten the URL")]
    UriTooLong {
        /// The limit.
        limit: usize,
    },
    /// The body is longer than the limit.
    #[error("the request body is over {limit} bytes; send a smaller body")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// Anything else that is not HTTP/1.x as this server reads it.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
}

impl FramingError {
    /// The HTTP status this error earns.
    pub fn status(&self) -> u16 {
        match self {
            FramingError::HeadTooLarge { .. } => 431,
            FramingError::UriTooLong { .. } => 414,
            FramingError::BodyTooLarge { .. } => 413,
            FramingError::Malformed(_) => 400,
        }
    }
}

fn malformed(msg: impl Into<String>) -> FramingError {
    FramingError::Malformed(msg.into())
}

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Method.
    pub method: Method,
    /// Request target, as sent.
    pub target: String,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// Header fields.
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub body: BodyFraming,
    /// Whether the client allows the connection to carry another request afterwards.
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

impl RequestHead {
    /// The path part of the target.
    pub fn path(&self) -> &str {
        let t = self.target.as_str();
        t.split(['?', '#']).next().unwrap_or(t)
    }
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete (and within the
/// limits), else the head and the bytes it took.
pub fn parse_head(
    buf: &[u8],
    limits: &FramingLimits,
) -> Result<Option<(RequestHead, usize)>, FramingError> {
    let too_large = FramingError::HeadTooLarge {
        limit: limits.max_head_bytes,
        fields: limits.max_headers,
    };
    // A request line that has not ended within the target limit (plus room for the method and
    // version) is a target that is too long.
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line_room = limits.max_uri_bytes + 32;
    match line_end {
        None if buf.len() > line_room => {
            return Err(FramingError::UriTooLong {
                limit: limits.max_uri_bytes,
            })
        }
        Some(n) if n > line_room => {
            return Err(FramingError::UriTooLong {
                limit: limits.max_uri_bytes,
            })
        }
        _ => {}
    }
    let mut fields = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut fields);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > limits.max_head_bytes {
                Err(too_large)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(too_large),
        Err(httparse::Error::Version) => {
            return Err(malformed(
                "only HTTP/1.0 and HTTP/1.1 are served (no HTTP/2 prior knowledge)",
            ))
        }
        Err(e) => return Err(malformed(e.to_string())),
    };
    if used > limits.max_head_bytes {
        return Err(too_large);
    }
    let target = req.path.unwrap_or("/");
    if target.len() > limits.max_uri_bytes {
        return Err(FramingError::UriTooLong {
            limit: limits.max_uri_bytes,
        });
    }
    if !target.starts_with('/') && target != "*" {
        return Err(malformed(format!(
            "the request target {target:?} must be a path starting with /"
        )));
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| malformed("invalid method"))?;
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| malformed(format!("invalid header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| malformed(format!("invalid value of header {}", h.name)))?;
        headers.append(name, value);
    }
    let body = body_framing(&headers, version, limits)?;
    let connection = axum::http::header::CONNECTION;
    let keep_alive = if version == Version::HTTP_11 {
        !has_token(&headers, &connection, "close")
    } else {
        has_token(&headers, &connection, "keep-alive")
    };
    let expect_continue = version == Version::HTTP_11
        && headers
            .get(axum::http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    Ok(Some((
        RequestHead {
            method,
            target: target.to_string(),
            version,
            headers,
            body,
            keep_alive,
            expect_continue,
        },
        used,
    )))
}

fn body_framing(
    headers: &HeaderMap,
    version: Version,
    limits: &FramingLimits,
) -> Result<BodyFraming, FramingError> {
    use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    let te: Vec<&HeaderValue> = headers.get_all(TRANSFER_ENCODING).iter().collect();
    let cl: Vec<&HeaderValue> = headers.get_all(CONTENT_LENGTH).iter().collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err(malformed(
                "send either Content-Length or Transfer-Encoding, not both",
            ));
        }
        if version == Version::HTTP_10 {
            return Err(malformed("Transfer-Encoding needs HTTP/1.1"));
        }
        let only_chunked = te.len() == 1
            && te[0]
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked");
        if !only_chunked {
            return Err(malformed(
                "the only Transfer-Encoding this server reads is `chunked`",
            ));
        }
        return Ok(BodyFraming::Chunked);
    }
    let mut length: Option<usize> = None;
    for v in cl {
        for part in v.to_str().unwrap_or("x").split(',') {
            let n: usize = part
                .trim()
                .parse()
                .map_err(|_| malformed(format!("invalid Content-Length {v:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    match length {
        None | Some(0) => Ok(BodyFraming::Empty),
        Some(n) if n > limits.max_body_bytes => Err(FramingError::BodyTooLarge {
            limit: limits.max_body_bytes,
        }),
        Some(n) => Ok(BodyFraming::Length(n)),
    }
}

/// Decodes a `Transfer-Encoding: chunked` body fed in pieces.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
    total: usize,
    limit: usize,
    trailer_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
    Trailer,
    Done,
}

/// Longest chunk-size line (with extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILER: usize = 16 * 1024;

impl ChunkedDecoder {
    /// A decoder that refuses bodies over `limit` bytes.
    pub fn new(limit: usize) -> ChunkedDecoder {
        ChunkedDecoder {
            state: ChunkState::Size,
            line: Vec::new(),
            total: 0,
            limit,
            trailer_bytes: 0,
        }
    }

    /// Whether the whole body (and its trailer) has been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes bytes of `input` (appending body data to `out`) and returns how many it took; it
    /// stops at the end of the body, leaving what follows (the next request) untouched.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, FramingError> {
        let mut i = 0;
        while i < input.len() && self.state != ChunkState::Done {
            match self.state {
                ChunkState::Size | ChunkState::Trailer | ChunkState::DataEnd => {
                    let b = input[i];
                    i += 1;
                    if b != b'\n' {
                        self.line.push(b);
                        let cap = if self.state == ChunkState::Trailer {
                            MAX_TRAILER
                        } else {
                            MAX_CHUNK_LINE
                        };
                        if self.line.len() > cap {
                            return Err(malformed("chunk framing line too long"));
                        }
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        ChunkState::Size => self.size_line(line)?,
                        ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
                        ChunkState::DataEnd => {
                            return Err(malformed("chunk data longer than its size"))
                        }
                        _ if line.is_empty() => ChunkState::Done,
                        _ => {
                            self.trailer_bytes += line.len();
                            if self.trailer_bytes > MAX_TRAILER {
                                return Err(malformed("chunked trailer too long"));
                            }
                            ChunkState::Trailer
                        }
                    };
                }
                ChunkState::Data(left) => {
                    let n = left.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    self.state = if n == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n)
                    };
                }
                ChunkState::Done => {}
            }
        }
        Ok(i)
    }

    fn size_line(&mut self, line: &[u8]) -> Result<ChunkState, FramingError> {
        let hex = line
            .split(|&b| b == b';')
            .next()
            .unwrap_or(&[])
            .trim_ascii();
        let text = std::str::from_utf8(hex).map_err(|_| malformed("bad chunk size"))?;
        let size = usize::from_str_radix(text, 16)
            .map_err(|_| malformed(format!("bad chunk size {text:?}")))?;
        self.total = self
            .total
            .checked_add(size)
            .filter(|&t| t <= self.limit)
            .ok_or(FramingError::BodyTooLarge { limit: self.limit })?;
        Ok(if size == 0 {
            ChunkState::Trailer
        } else {
            ChunkState::Data(size)
        })
    }
}

/// The reason phrase of a status.
pub fn reason(status: u16) -> &'static str {
    axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FramingLimits {
        FramingLimits {
            max_head_bytes: 256,
            max_uri_bytes: 64,
            max_headers: 4,
            max_body_bytes: 100,
        }
    }

    #[test]
    fn a_complete_head_with_a_length_body() {
        let raw = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let (h, n) = parse_head(raw, &limits()).unwrap().unwrap();
        assert_eq!(&raw[n..], b"hello");
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.path(), "/v1/completions");
        assert_eq!(h.body, BodyFraming::Length(5));
        assert!(h.keep_alive && !h.expect_continue);
    }

    #[test]
    fn partial_heads_wait_until_they_pass_a_limit() {
        let l = limits();
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n", &l)
            .unwrap()
            .is_none());
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', 300));
        assert_eq!(parse_head(&big, &l).unwrap_err().status(), 431);
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "x".repeat(70));
        assert_eq!(parse_head(long.as_bytes(), &l).unwrap_err().status(), 414);
        let unended = format!("GET /{}", "x".repeat(200));
        assert_eq!(
            parse_head(unended.as_bytes(), &l).unwrap_err().status(),
            414
        );
        let many = "GET / HTTP/1.1\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\ne: 1\r\n\r\n";
        assert_eq!(parse_head(many.as_bytes(), &l).unwrap_err().status(), 431);
    }

    #[test]
    fn framing_conflicts_and_oversized_bodies_are_refused() {
        let l = limits();
        let status = |raw: &str| parse_head(raw.as_bytes(), &l).unwrap_err().status();
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n"),
            413
        );
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            400
        );
        assert_eq!(status("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 400);
        assert_eq!(status("GET http://x/ HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("G\0T / HTTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn connection_semantics_follow_the_version() {
        let l = limits();
        let head = |raw: &str| parse_head(raw.as_bytes(), &l).unwrap().unwrap().0;
        assert!(!head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        let h = head("POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n");
        assert!(h.expect_continue);
    }

    #[test]
    fn chunked_bodies_decode_in_any_split_and_stop_at_their_end() {
        let raw = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nGET /next";
        for split in 1..raw.len() {
            let mut d = ChunkedDecoder::new(100);
            let mut out = Vec::new();
            let a = d.decode(&raw[..split], &mut out).unwrap();
            let b = if d.is_done() {
                0
            } else {
                d.decode(&raw[a..], &mut out).unwrap()
            };
            assert!(d.is_done(), "split {split}");
            assert_eq!(out, b"hello world");
            assert_eq!(&raw[a + b..], b"GET /next", "split {split}");
        }
        let mut d = ChunkedDecoder::new(8);
        assert_eq!(
            d.decode(b"9\r\n", &mut Vec::new()).unwrap_err().status(),
            413
        );
        let mut d = ChunkedDecoder::new(100);
        assert_eq!(
            d.decode(b"zz\r\n", &mut Vec::new()).unwrap_err().status(),
            400
        );
        let mut d = ChunkedDecoder::new(100);
        assert_eq!(
            d.decode(b"2\r\nabc\r\n", &mut Vec::new())
                .unwrap_err()
                .status(),
            400
        );
    }
}
