//! What real gRPC clients put on the wire, sent byte for byte to the agent's Workload API
//! and the daemon's admin socket, both served by the patched h2 (vendor/h2): an
//! `:authority` that is a percent-encoded socket path (gRPC's C core), a raw path
//! (grpc-java), none at all; a header block encoded against the default 4,096-byte HPACK
//! table before the client has read the server's SETTINGS (which ask for a zero-size
//! table); and, after the acknowledgement, a block that opens with a dynamic table size
//! update. The frames and HPACK blocks are written here by hand; the answers are decoded
//! with fluke-hpack, an HPACK implementation nobody here wrote.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use mayfly_tests::harness::init;
use mayfly_tests::interop::DevMode;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// An HTTP/2 connection driven frame by frame.
struct RawConnection {
    socket: UnixStream,
    decoder: fluke_hpack::Decoder<'static>,
}

/// What came back on one stream.
#[derive(Debug, Default)]
struct Answer {
    headers: BTreeMap<String, String>,
    data_bytes: usize,
    reset: Option<u32>,
    /// The server ended the stream (trailers with END_STREAM).
    ended: bool,
}

impl RawConnection {
    /// Connects and sends the preface and an empty SETTINGS, reading nothing yet.
    fn open(path: &Path) -> Self {
        let socket = UnixStream::connect(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut connection = Self {
            socket,
            decoder: fluke_hpack::Decoder::new(),
        };
        connection.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        connection.frame(SETTINGS, 0, 0, &[]);
        connection
    }

    fn write(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).unwrap();
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.write(&frame);
    }

    /// A request: its header block, then one gRPC message (empty body) ending the stream.
    fn request(&mut self, stream: u32, block: &[u8], message: &[u8]) {
        self.frame(HEADERS, END_HEADERS, stream, block);
        let mut body = vec![0u8];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        self.frame(DATA, END_STREAM, stream, &body);
    }

    fn read_frame(&mut self) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        self.socket.read_exact(&mut head)?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        self.socket.read_exact(&mut payload)?;
        Ok((head[3], head[4], stream, payload))
    }

    /// Reads until every stream in `streams` has its response headers and a message (or was
    /// reset).
    fn answers(&mut self, streams: &[u32]) -> BTreeMap<u32, Answer> {
        self.read_until(|answers| {
            streams.iter().all(|s| {
                answers.get(s).is_some_and(|a| {
                    a.reset.is_some() || (!a.headers.is_empty() && a.data_bytes > 0)
                })
            })
        })
    }

    /// Reads until `stream` ends or is reset.
    fn until_end(&mut self, stream: u32) -> Answer {
        let mut answers = self.read_until(|answers| {
            answers
                .get(&stream)
                .is_some_and(|a| a.ended || a.reset.is_some())
        });
        answers.remove(&stream).unwrap_or_default()
    }

    /// Reads frames into per-stream answers until `done` holds, acknowledging the server's
    /// SETTINGS and answering PINGs on the way, and decoding every header block in order so
    /// the HPACK state stays in step. A GOAWAY fails the test.
    fn read_until(
        &mut self,
        done: impl Fn(&BTreeMap<u32, Answer>) -> bool,
    ) -> BTreeMap<u32, Answer> {
        let mut answers: BTreeMap<u32, Answer> = BTreeMap::new();
        let mut frames = 0;
        while !done(&answers) {
            let (kind, flags, stream, payload) = self.read_frame().unwrap_or_else(|e| {
                panic!(
                    "the server closed the connection or did not answer ({e}) after {frames} \
                     frames; what had come by then: {answers:?}"
                )
            });
            frames += 1;
            match kind {
                SETTINGS if flags & ACK == 0 => self.frame(SETTINGS, ACK, 0, &[]),
                PING if flags & ACK == 0 => self.frame(PING, ACK, 0, &payload),
                HEADERS => {
                    assert!(
                        flags & END_HEADERS != 0,
                        "CONTINUATION is not expected here"
                    );
                    let decoded = self.decoder.decode(&payload).expect("a valid HPACK block");
                    let answer = answers.entry(stream).or_default();
                    for (name, value) in decoded {
                        answer.headers.insert(
                            String::from_utf8_lossy(&name).into_owned(),
                            String::from_utf8_lossy(&value).into_owned(),
                        );
                    }
                    answer.ended |= flags & END_STREAM != 0;
                }
                DATA => answers.entry(stream).or_default().data_bytes += payload.len(),
                RST_STREAM => {
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    answers.entry(stream).or_default().reset = Some(code);
                }
                GOAWAY => {
                    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                    panic!(
                        "GOAWAY with error code {code}: {}",
                        String::from_utf8_lossy(&payload[8..])
                    );
                }
                _ => {}
            }
        }
        answers
    }
}

/// HPACK's prefixed integer (RFC 7541 §5.1) under `first`'s high bits.
fn integer(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A string literal, not Huffman-coded.
fn string(out: &mut Vec<u8>, text: &str) {
    integer(out, 0, 7, text.len());
    out.extend_from_slice(text.as_bytes());
}

/// Header block builder: the representations a client's encoder chooses between.
#[derive(Default)]
struct Block(Vec<u8>);

impl Block {
    /// A dynamic table size update (§6.3).
    fn size_update(mut self, size: usize) -> Self {
        integer(&mut self.0, 0x20, 5, size);
        self
    }
    /// A field from the static or dynamic table (§6.1).
    fn indexed(mut self, index: usize) -> Self {
        integer(&mut self.0, 0x80, 7, index);
        self
    }
    /// A literal added to the dynamic table (§6.2.1), its name by index or new.
    fn indexing(mut self, name: Name, value: &str) -> Self {
        self.literal(0x40, 6, name, value);
        self
    }
    /// A literal the table does not keep (§6.2.2).
    fn plain(mut self, name: Name, value: &str) -> Self {
        self.literal(0x00, 4, name, value);
        self
    }
    fn literal(&mut self, first: u8, bits: u8, name: Name, value: &str) {
        match name {
            Name::Static(index) => integer(&mut self.0, first, bits, index),
            Name::New(text) => {
                self.0.push(first);
                string(&mut self.0, text);
            }
        }
        string(&mut self.0, value);
    }
}

#[derive(Clone, Copy)]
enum Name {
    Static(usize),
    New(&'static str),
}

// Static table indices (RFC 7541 Appendix A).
const AUTHORITY: usize = 1;
const METHOD_POST: usize = 3;
const PATH: usize = 4;
const SCHEME_HTTP: usize = 6;
const CONTENT_TYPE: usize = 31;
/// The first dynamic table index.
const DYNAMIC: usize = 62;

/// gRPC's C core names a Unix socket by its percent-encoded path.
fn c_core_authority(path: &Path) -> String {
    let text = path.display().to_string();
    text.trim_start_matches('/').replace('/', "%2F")
}

/// The header block every gRPC client sends, with `authority` (if any), as a client that
/// keeps an HPACK table would encode it: everything but the method and scheme added to
/// the dynamic table.
fn indexing_request(method: &str, authority: Option<&str>, header: bool) -> Block {
    let mut block = Block::default()
        .indexed(METHOD_POST)
        .indexed(SCHEME_HTTP)
        .indexing(Name::Static(PATH), method);
    if let Some(authority) = authority {
        block = block.indexing(Name::Static(AUTHORITY), authority);
    }
    block = block
        .indexing(Name::Static(CONTENT_TYPE), "application/grpc")
        .indexing(Name::New("te"), "trailers");
    if header {
        block = block.indexing(Name::New("workload.spiffe.io"), "true");
    }
    block
}

fn assert_answered(answers: &BTreeMap<u32, Answer>, stream: u32, what: &str) {
    let answer = &answers[&stream];
    assert_eq!(
        answer.reset, None,
        "{what}: the stream was reset: {answer:?}"
    );
    assert_eq!(
        answer.headers.get(":status").map(String::as_str),
        Some("200"),
        "{what}: {answer:?}"
    );
    assert!(answer.data_bytes > 5, "{what}: no gRPC message: {answer:?}");
}

#[test]
fn the_workload_api_serves_what_c_core_grpc_java_and_others_send() {
    init();
    let dev = DevMode::start().unwrap();
    let socket = &dev.workload_socket;
    let mut h2 = RawConnection::open(socket);
    let fetch = "/SpiffeWorkloadAPI/FetchX509SVID";

    // Before the server's SETTINGS are read: stream 1 as the C core sends it, filling
    // the default 4,096-byte table; stream 3 refers to what stream 1 added. A decoder
    // that applied the zero-size table before the acknowledgement could not read it.
    let authority = c_core_authority(socket);
    h2.request(1, &indexing_request(fetch, Some(&authority), true).0, &[]);
    // Dynamic table now (newest first): workload.spiffe.io, te, content-type,
    // :authority, :path.
    let again = Block::default()
        .indexed(METHOD_POST)
        .indexed(SCHEME_HTTP)
        .indexed(DYNAMIC + 4)
        .indexed(DYNAMIC + 3)
        .indexed(DYNAMIC + 2)
        .indexed(DYNAMIC + 1)
        .indexed(DYNAMIC);
    h2.request(3, &again.0, &[]);
    let answers = h2.answers(&[1, 3]);
    assert_answered(&answers, 1, "a percent-encoded socket path as :authority");
    assert_answered(
        &answers,
        3,
        "a block that uses the default table before SETTINGS",
    );

    // Acknowledged by now (`answers` sent the ACK): the next block opens with the size
    // update, and carries no :authority at all.
    let no_authority = Block::default()
        .size_update(0)
        .indexed(METHOD_POST)
        .indexed(SCHEME_HTTP)
        .plain(Name::Static(PATH), fetch)
        .plain(Name::Static(CONTENT_TYPE), "application/grpc")
        .plain(Name::New("te"), "trailers")
        .plain(Name::New("workload.spiffe.io"), "true");
    h2.request(5, &no_authority.0, &[]);
    // grpc-java: the raw path.
    let raw_path = Block::default()
        .indexed(METHOD_POST)
        .indexed(SCHEME_HTTP)
        .plain(Name::Static(PATH), fetch)
        .plain(Name::Static(AUTHORITY), &socket.display().to_string())
        .plain(Name::Static(CONTENT_TYPE), "application/grpc")
        .plain(Name::New("te"), "trailers")
        .plain(Name::New("workload.spiffe.io"), "true");
    h2.request(7, &raw_path.0, &[]);
    let answers = h2.answers(&[5, 7]);
    assert_answered(&answers, 5, "no :authority, after a table size update");
    assert_answered(&answers, 7, "a raw socket path as :authority");

    // The authority still means nothing: a request without the security header is
    // refused as before, whatever it names.
    let refused = Block::default()
        .indexed(METHOD_POST)
        .indexed(SCHEME_HTTP)
        .plain(Name::Static(PATH), fetch)
        .plain(Name::Static(AUTHORITY), &authority)
        .plain(Name::Static(CONTENT_TYPE), "application/grpc")
        .plain(Name::New("te"), "trailers");
    h2.request(9, &refused.0, &[]);
    let answer = h2.until_end(9);
    assert_eq!(
        answer.headers.get("grpc-status").map(String::as_str),
        Some("3"),
        "InvalidArgument without the header: {answer:?}"
    );
}

#[test]
fn the_admin_socket_serves_a_c_core_authority_too() {
    init();
    let dev = DevMode::start().unwrap();
    let socket = &dev.admin_socket;
    let mut h2 = RawConnection::open(socket);
    let block = indexing_request(
        "/mayfly.v1.Admin/ListEntries",
        Some(&c_core_authority(socket)),
        false,
    );
    h2.request(1, &block.0, &[]);
    let answer = h2.until_end(1);
    assert_eq!(answer.reset, None, "{answer:?}");
    assert_eq!(
        answer.headers.get("grpc-status").map(String::as_str),
        Some("0"),
        "ListEntries answered OK: {answer:?}"
    );
    assert!(answer.data_bytes > 5, "the entries came back: {answer:?}");
}
