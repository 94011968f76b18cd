//! The operations endpoint both programs serve on `metrics_listen`, over plain HTTP/1.1:
//! `/metrics` (the Prometheus text format), `/healthz` (the process answers) and `/readyz`
//! (it can do its job). What the paths say comes from the program, through [`OpsEndpoint`].

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What a program serves on its operations endpoint.
pub trait OpsEndpoint: Send + Sync + 'static {
    /// Why the program is not ready, in one line an operator can act on.
    type NotReady: fmt::Display + Send;

    /// The metrics as they are at this scrape, in the Prometheus text format ([`render`]).
    fn metrics(&self) -> String;

    /// Whether the program can do its job now; asked on every `GET /readyz`. A check
    /// that waits on something (a database) bounds the wait itself, so that a probe gets
    /// its 503 before the prober's own timeout.
    fn readiness(&self) -> impl Future<Output = Result<(), Self::NotReady>> + Send;
}

/// Why the endpoint could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    #[error("binding the metrics endpoint (metrics_listen) on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the endpoint's address (before serving, so that a port in use stops the program
/// at start with the address named).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, OpsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| OpsError::Bind { addr, source })
}

/// The registry's metrics in the Prometheus text format (version 0.0.4), the one every
/// scraper reads: counters keep their `_total` name on the `# TYPE` line.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an error here would be a metric refusing to
    // encode itself, and a scrape with what was written so far is still worth serving.
    if let Err(e) = prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding the metrics failed part-way");
    }
    out
}

/// Serves `endpoint` on `listener` until `stop` turns true.
pub async fn serve<E: OpsEndpoint>(
    listener: TcpListener,
    endpoint: Arc<E>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    continue;
                }
            },
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let endpoint = endpoint.clone();
                async move {
                    let answer = answer(request.method(), request.uri().path(), &*endpoint).await;
                    Ok::<_, Infallible>(answer.into_response())
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(peer = %peer, error = %e, "metrics connection ended");
            }
        });
    }
}

/// One answer, before it becomes an HTTP response.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: String,
}

const TEXT: &str = "text/plain; charset=utf-8";

impl Answer {
    fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: TEXT,
            body: body.into(),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = self.status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        response
    }
}

async fn answer<E: OpsEndpoint>(method: &Method, path: &str, endpoint: &E) -> Answer {
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return Answer::text(
            StatusCode::NOT_FOUND,
            format!("not found: {path}; this endpoint serves /metrics, /healthz and /readyz\n"),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return Answer::text(StatusCode::METHOD_NOT_ALLOWED, format!("only GET {path}\n"));
    }
    match path {
        "/metrics" => Answer {
            status: StatusCode::OK,
            content_type: prometheus_text::CONTENT_TYPE,
            body: endpoint.metrics(),
        },
        // Answering at all is the whole check: the process runs and its runtime serves.
        "/healthz" => Answer::text(StatusCode::OK, "ok\n"),
        _ => match endpoint.readiness().await {
            Ok(()) => Answer::text(StatusCode::OK, "ready\n"),
            Err(why) => Answer::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", one_line(&why.to_string())),
            ),
        },
    }
}

/// A reason on one line, whatever the error it came from printed.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    use prometheus_client::metrics::counter::Counter;

    /// Ready unless told why not.
    struct Fixed(Option<&'static str>);

    impl OpsEndpoint for Fixed {
        type NotReady = &'static str;

        fn metrics(&self) -> String {
            let mut registry = Registry::default();
            let scrapes: Counter = Counter::default();
            scrapes.inc();
            registry.register("test_scrapes", "Scrapes", scrapes);
            render(&registry)
        }

        async fn readiness(&self) -> Result<(), &'static str> {
            match self.0 {
                None => Ok(()),
                Some(why) => Err(why),
            }
        }
    }

    #[tokio::test]
    async fn each_path_answers_for_itself() {
        let ready = Fixed(None);
        let metrics = answer(&Method::GET, "/metrics", &ready).await;
        assert_eq!(metrics.status, StatusCode::OK);
        assert_eq!(
            metrics.content_type,
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert!(
            metrics.body.contains("# TYPE test_scrapes_total counter\n")
                && metrics.body.contains("\ntest_scrapes_total 1\n"),
            "{}",
            metrics.body
        );
        assert_eq!(
            answer(&Method::GET, "/healthz", &ready).await,
            Answer::text(StatusCode::OK, "ok\n")
        );
        assert_eq!(
            answer(&Method::GET, "/readyz", &ready).await,
            Answer::text(StatusCode::OK, "ready\n")
        );
    }

    #[tokio::test]
    async fn not_ready_is_a_503_with_the_reason_on_one_line() {
        let waiting = Fixed(Some("the datastore did not answer:\n  connection refused"));
        assert_eq!(
            answer(&Method::GET, "/readyz", &waiting).await,
            Answer::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the datastore did not answer: connection refused\n"
            )
        );
        // Alive all the same.
        assert_eq!(
            answer(&Method::GET, "/healthz", &waiting).await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let ready = Fixed(None);
        assert_eq!(
            answer(&Method::GET, "/secrets", &ready).await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            answer(&Method::POST, "/readyz", &ready).await.status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            answer(&Method::HEAD, "/healthz", &ready).await.status,
            StatusCode::OK
        );
    }
}
