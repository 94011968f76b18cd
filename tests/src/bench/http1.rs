//! A minimal keep-alive HTTP/1.1 client for loopback peers (OpenBao's API).
//!
//! Bench traffic may only go to this machine, so [`LoopbackAddr::parse`] refuses any host
//! other than 127.0.0.1 / localhost rather than resolving it.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// An `http://127.0.0.1:PORT` base address, checked to be on the loopback interface.
#[derive(Clone, Debug)]
pub struct LoopbackAddr {
    pub socket: SocketAddr,
    /// The Host header value, as given (so `localhost:8200` stays `localhost:8200`).
    host_header: HeaderValue,
}

impl LoopbackAddr {
    pub fn parse(addr: &str) -> Result<Self> {
        let uri: Uri = addr
            .parse()
            .with_context(|| format!("bad address {addr:?}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("{addr}: only plain http:// is supported (the bench peer runs on loopback)");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("{addr}: no host"))?;
        match authority.host() {
            "127.0.0.1" | "localhost" => {}
            other => bail!("{addr}: host {other} is not 127.0.0.1; bench traffic stays local"),
        }
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            socket: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            host_header: HeaderValue::from_str(authority.as_str())
                .with_context(|| format!("{addr}: bad host"))?,
        })
    }
}

/// One HTTP/1.1 connection, reused for every request it sends.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    addr: LoopbackAddr,
    extra_headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Conn {
    pub async fn connect(
        addr: &LoopbackAddr,
        extra_headers: Vec<(header::HeaderName, HeaderValue)>,
    ) -> Result<Self> {
        let stream = TcpStream::connect(addr.socket)
            .await
            .with_context(|| format!("connecting to {}", addr.socket))?;
        // Small request/response pairs: Nagle would add delay to every one of them.
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        // The connection task ends when `sender` is dropped or the peer closes; its error
        // shows up on the next request, so there is nothing to do with it here.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            addr: addr.clone(),
            extra_headers,
        })
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes)> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.host_header.clone())
            .header(header::CONTENT_TYPE, "application/json");
        for (k, v) in &self.extra_headers {
            req = req.header(k, v);
        }
        let req = req.body(Full::new(body)).context("building the request")?;
        self.sender
            .ready()
            .await
            .context("connection closed before the request")?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .context("sending the request")?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("reading the response body")?
            .to_bytes();
        Ok((status, body))
    }
}

/// The answer to `GET /metrics` from a daemon's metrics endpoint at `addr` (`IP:PORT`).
pub async fn metrics(addr: &str) -> Result<String> {
    let addr = LoopbackAddr::parse(&format!("http://{addr}"))?;
    let mut conn = Conn::connect(&addr, Vec::new()).await?;
    let (status, body) = conn.send(Method::GET, "/metrics", Bytes::new()).await?;
    if !status.is_success() {
        bail!("GET /metrics answered {status}");
    }
    Ok(String::from_utf8(body.to_vec())?)
}

/// One sample from the metrics endpoint at `addr`, by its full name with labels;
/// `None` if absent.
pub async fn metric(addr: &str, series: &str) -> Result<Option<f64>> {
    let text = metrics(addr).await?;
    Ok(text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_is_accepted() {
        let a = LoopbackAddr::parse("http://127.0.0.1:8200").unwrap();
        assert_eq!(a.socket, "127.0.0.1:8200".parse().unwrap());
        let a = LoopbackAddr::parse("http://localhost:9").unwrap();
        assert_eq!(a.socket, "127.0.0.1:9".parse().unwrap());
        assert!(LoopbackAddr::parse("http://10.0.0.1:8200").is_err());
        assert!(LoopbackAddr::parse("http://example.org:8200").is_err());
        assert!(LoopbackAddr::parse("https://127.0.0.1:8200").is_err());
    }
}
