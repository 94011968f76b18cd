//! Sends one FetchX509SVID on a Workload API connection it inherited as file descriptor
//! `argv[1]`, opened by another process: what a forked child holding its parent's
//! connection would do. Prints `ok SPIFFE_ID` or `err CODE MESSAGE`.

use std::os::fd::{FromRawFd as _, OwnedFd};

use futures::StreamExt as _;
use hyper_util::rt::TokioIo;
use tonic::transport::Endpoint;

use mayfly_proto::workload::X509svidRequest;
use mayfly_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let fd: i32 = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("give the inherited descriptor"))?
        .parse()?;
    // SAFETY: the descriptor was inherited open across exec for this program alone, and
    // nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let std_stream = std::os::unix::net::UnixStream::from(owned);
    std_stream.set_nonblocking(true)?;
    let stream = std::sync::Mutex::new(Some(tokio::net::UnixStream::from_std(std_stream)?));
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let taken = stream.lock().unwrap().take();
            async move {
                taken
                    .map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the inherited connection is used up"))
            }
        }))
        .await?;
    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse()?);
    match SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request)
        .await
    {
        Ok(response) => match response.into_inner().next().await {
            Some(Ok(first)) => println!(
                "ok {}",
                first
                    .svids
                    .first()
                    .map(|s| s.spiffe_id.clone())
                    .unwrap_or_default()
            ),
            Some(Err(status)) => println!("err {:?} {}", status.code(), status.message()),
            None => println!("err EMPTY the stream ended"),
        },
        Err(status) => println!("err {:?} {}", status.code(), status.message()),
    }
    Ok(())
}
