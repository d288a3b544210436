//! `tidemesh-test-spiffe-fetch`: a minimal app on a real SPIFFE client
//! library (the `spiffe` crate) that asks a Workload API socket for its
//! default X.509-SVID once, for tests that need the caller to be another
//! process (another executable, or another uid under `setpriv`).
//!
//! Usage: `tidemesh-test-spiffe-fetch unix:///path/to/workload.sock`.
//! Prints one line, `svid SPIFFE_ID` (exit 0) or `error WHAT` (exit 1),
//! where WHAT is `no-identity-issued`, `permission-denied: …` or the
//! library's error text.
//!
//! Not part of the product; built with the workspace so the tests find it.

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: tidemesh-test-spiffe-fetch unix:///path/to/workload.sock");
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("error runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fetched = rt.block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(&addr).await?;
        client.fetch_x509_svid().await
    });
    match fetched {
        Ok(svid) => {
            println!("svid {}", svid.spiffe_id());
            ExitCode::SUCCESS
        }
        Err(spiffe::WorkloadApiError::NoIdentityIssued) => {
            println!("error no-identity-issued");
            ExitCode::FAILURE
        }
        Err(spiffe::WorkloadApiError::PermissionDenied(m)) => {
            println!("error permission-denied: {m}");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("error {e}");
            ExitCode::FAILURE
        }
    }
}
