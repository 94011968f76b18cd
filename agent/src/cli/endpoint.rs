//! Where a Workload API client connects: the `--socket` flag and `SPIFFE_ENDPOINT_SOCKET`
//! take the same forms, parsed once into a [`WorkloadEndpoint`] (the SPIFFE Workload
//! Endpoint spec's `unix:` and `tcp:` URIs, plus a bare path for the flag's old form).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

/// Where the agent listens when neither the flag nor the variable says.
pub const DEFAULT_SOCKET: &str = "/run/mayfly-agent/api.sock";

/// A Workload API address a client can connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadEndpoint {
    /// A Unix socket; the path is made absolute when parsed, so a child handed it in
    /// `SPIFFE_ENDPOINT_SOCKET` finds the same socket from any directory.
    Unix(PathBuf),
    /// `tcp://IP:port`, for a Workload API served on TCP (the spec allows only an IP).
    Tcp(SocketAddr),
}

/// Why an endpoint was refused, in the words of the spec's forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    #[error("`{0}` is empty: use unix:///absolute/path, a path, or tcp://IP:port")]
    Empty(String),
    #[error("`{0}`: a unix: endpoint names no host (write unix:///absolute/path)")]
    UnixAuthority(String),
    #[error("`{0}`: a unix: endpoint needs an absolute path (unix:///absolute/path)")]
    UnixRelative(String),
    #[error("`{0}`: a tcp: endpoint is tcp://IP:port with an IP address and a port")]
    Tcp(String),
    #[error("`{0}`: a Workload API endpoint has no query or fragment")]
    QueryOrFragment(String),
    #[error("`{0}`: unsupported scheme; use unix:///absolute/path, a path, or tcp://IP:port")]
    Scheme(String),
}

impl FromStr for WorkloadEndpoint {
    type Err = EndpointError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let owned = || text.to_owned();
        if text.trim().is_empty() {
            return Err(EndpointError::Empty(owned()));
        }
        let scheme = text.split_once(':').map(|(scheme, _)| scheme).filter(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        });
        let Some(scheme) = scheme else {
            // No scheme: the flag's path form, relative to where the command runs.
            return Ok(Self::Unix(absolute(Path::new(text))));
        };
        if text.contains(['?', '#']) {
            return Err(EndpointError::QueryOrFragment(owned()));
        }
        let rest = &text[scheme.len() + 1..];
        match scheme {
            "unix" => {
                // unix:///path (empty authority) and unix:/path (none) are the same.
                let path = match rest.strip_prefix("//") {
                    Some(after) if after.starts_with('/') => after,
                    Some(_) => return Err(EndpointError::UnixAuthority(owned())),
                    None => rest,
                };
                if !path.starts_with('/') {
                    return Err(EndpointError::UnixRelative(owned()));
                }
                Ok(Self::Unix(PathBuf::from(path)))
            }
            "tcp" => {
                let addr = rest
                    .strip_prefix("//")
                    .filter(|a| !a.contains('/'))
                    .ok_or_else(|| EndpointError::Tcp(owned()))?;
                // `[::1]:8081` and `127.0.0.1:8081` parse; a host name does not.
                addr.parse()
                    .map(Self::Tcp)
                    .map_err(|_| EndpointError::Tcp(owned()))
            }
            _ if Path::new(text).exists() => Ok(Self::Unix(absolute(Path::new(text)))),
            _ => Err(EndpointError::Scheme(owned())),
        }
    }
}

impl fmt::Display for WorkloadEndpoint {
    /// The URI form, as `SPIFFE_ENDPOINT_SOCKET` carries it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

impl WorkloadEndpoint {
    /// The flag if given, else `SPIFFE_ENDPOINT_SOCKET`, else [`DEFAULT_SOCKET`]; an
    /// unusable value is an error naming where it came from.
    pub fn resolve(flag: Option<&str>) -> anyhow::Result<Self> {
        if let Some(flag) = flag {
            return flag.parse().map_err(|e| anyhow::anyhow!("--socket {e}"));
        }
        match std::env::var("SPIFFE_ENDPOINT_SOCKET") {
            Ok(value) => value
                .parse()
                .map_err(|e| anyhow::anyhow!("SPIFFE_ENDPOINT_SOCKET {e}")),
            Err(_) => Ok(Self::Unix(PathBuf::from(DEFAULT_SOCKET))),
        }
    }

    /// A gRPC channel to this endpoint. A socket that is missing or refuses is reported
    /// with its address and the system's reason, so that it is not mistaken for an answer.
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        let connected = match self {
            Self::Unix(path) => {
                let path = path.clone();
                TonicEndpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            }
            Self::Tcp(addr) => {
                TonicEndpoint::from_shared(format!("http://{addr}"))
                    .context("a tcp endpoint")?
                    .connect()
                    .await
            }
        };
        connected.map_err(|e| {
            let reason = std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.to_string());
            anyhow::anyhow!("cannot reach the Workload API at {self}: {reason}")
        })
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(path: &str) -> WorkloadEndpoint {
        WorkloadEndpoint::Unix(PathBuf::from(path))
    }

    #[test]
    fn the_flag_and_the_variable_take_the_same_forms() {
        assert_eq!("unix:///run/a.sock".parse(), Ok(unix("/run/a.sock")));
        assert_eq!("unix:/run/a.sock".parse(), Ok(unix("/run/a.sock")));
        assert_eq!("/run/a.sock".parse(), Ok(unix("/run/a.sock")));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            "a.sock".parse(),
            Ok(WorkloadEndpoint::Unix(cwd.join("a.sock")))
        );
        assert_eq!(
            "tcp://127.0.0.1:8081".parse(),
            Ok(WorkloadEndpoint::Tcp("127.0.0.1:8081".parse().unwrap()))
        );
        assert_eq!(
            "tcp://[::1]:8081".parse(),
            Ok(WorkloadEndpoint::Tcp("[::1]:8081".parse().unwrap()))
        );
    }

    #[test]
    fn what_is_not_an_endpoint_is_refused_by_name() {
        let cases = [
            ("", "is empty"),
            ("unix://host/run/a.sock", "names no host"),
            ("unix:run/a.sock", "absolute path"),
            ("tcp://localhost:8081", "IP address"),
            ("tcp://127.0.0.1", "IP address"),
            ("tcp://127.0.0.1:8081/x", "IP address"),
            ("unix:///run/a.sock?x=1", "no query"),
            ("http://127.0.0.1:8081", "unsupported scheme"),
        ];
        for (text, says) in cases {
            let err = text.parse::<WorkloadEndpoint>().unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn the_uri_form_round_trips() {
        for text in [
            "unix:///run/a.sock",
            "tcp://127.0.0.1:8081",
            "tcp://[::1]:8081",
        ] {
            let endpoint: WorkloadEndpoint = text.parse().unwrap();
            assert_eq!(endpoint.to_string(), text);
        }
    }

    #[tokio::test]
    async fn a_missing_socket_is_named_with_its_path() {
        let endpoint = unix("/nonexistent/mayfly/api.sock");
        let err = endpoint.connect().await.unwrap_err().to_string();
        assert!(
            err.contains("cannot reach the Workload API at unix:///nonexistent/mayfly/api.sock"),
            "{err}"
        );
        assert!(err.contains("No such file or directory"), "{err}");
    }
}
