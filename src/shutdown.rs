//! Shutdown signals: SIGINT or SIGTERM cancels the returned token (graceful: stop taking
//! messages, flush, acknowledge what settled); a second signal exits at once.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT/SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait().await;
        tracing::info!("shutting down: flushing (signal again to exit at once)");
        t.cancel();
        wait().await;
        tracing::warn!(
            "second signal: exiting without flushing; unsettled messages will be redelivered"
        );
        std::process::exit(130);
    });
    token
}

async fn wait() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
