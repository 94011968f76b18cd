//! The admin API's audit export: the trail streamed in pages, so exporting a long one
//! does not hold it all in memory.

use tonic::Status;

use mayfly_proto::v1;

use super::AdminApi;
use crate::api::convert;
use crate::store::AuditFilter;

/// The stream `ListAudit` answers with.
pub type AuditStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::AuditRecord, Status>> + Send>>;

impl AdminApi {
    pub(super) fn audit_pages(&self, body: v1::ListAuditRequest) -> AuditStream {
        let audit = self.audit.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut filter = AuditFilter {
                since_ms: (body.since_ms > 0).then_some(body.since_ms),
                subject: Some(body.subject).filter(|s| !s.is_empty()),
                action: Some(body.action).filter(|s| !s.is_empty()),
                after_seq: 0,
                limit: 0,
            };
            let mut left = if body.limit > 0 { body.limit } else { i64::MAX };
            while left > 0 {
                filter.limit = left.min(2000);
                let page = match audit.list(&filter).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                        return;
                    }
                };
                let Some(last) = page.last() else {
                    return;
                };
                filter.after_seq = last.seq;
                left -= page.len() as i64;
                for row in page {
                    if tx.send(Ok(convert::audit_record(row))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}
