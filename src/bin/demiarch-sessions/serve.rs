//! `serve`: the library's dashboard router (`demiarch_sessions::web`) on
//! the store `--database-url` names, at `--listen`, until Ctrl-C.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use demiarch_sessions::web::{self, AccessPolicy, Limits, LoopbackAccess, TokenAccess, WebOptions};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::commands::Ctx;
use crate::exit::{Failure, ADDRESS_IN_USE, INTERNAL, INVALID_INPUT};

/// How often the live stream looks for commits no wake-up announces (other
/// processes on a SQLite file, other instances on MariaDB).
pub const WATCH_POLL: Duration = Duration::from_millis(25);

pub struct Options {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub read_only: bool,
    pub limits: Limits,
}

pub async fn run(ctx: Ctx, options: Options) -> Result<String, Failure> {
    let access: Arc<dyn AccessPolicy> = match (&options.token, options.read_only) {
        (Some(token), read_only) => {
            let access = TokenAccess::new(token.clone()).map_err(|_| {
                Failure::new(
                    INVALID_INPUT,
                    "invalid --token: use at least 16 printable ASCII characters, without ; , \" or \\",
                )
            })?;
            match read_only {
                true => Arc::new(access.read_only()),
                false => Arc::new(access),
            }
        }
        (None, _) if !options.listen.ip().is_loopback() => {
            return Err(Failure::new(
                INVALID_INPUT,
                format!(
                    "refusing to listen on {} without --token: anyone who can reach it could end \
                     sessions; pass --token (or DEMIARCH_DASHBOARD_TOKEN), or listen on 127.0.0.1",
                    options.listen
                ),
            ))
        }
        (None, true) => Arc::new(LoopbackAccess::read_only()),
        (None, false) => Arc::new(LoopbackAccess::full()),
    };
    let prometheus = PrometheusBuilder::new().install_recorder().map_err(|e| {
        Failure::new(
            INTERNAL,
            format!("cannot install the metrics recorder: {e}"),
        )
    })?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => Failure::new(
                ADDRESS_IN_USE,
                format!(
                    "cannot listen on {}: the port is in use by another program; pick another \
                     with --listen PORT",
                    options.listen
                ),
            ),
            _ => Failure::new(
                ADDRESS_IN_USE,
                format!("cannot listen on {}: {e}", options.listen),
            ),
        })?;
    let address = listener
        .local_addr()
        .map_err(|e| Failure::new(INTERNAL, format!("cannot read the listening address: {e}")))?;
    // Histograms are drained by a scrape; without one they would only grow.
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let (stop, stopping) = tokio::sync::watch::channel(false);
    eprintln!(
        "Dashboard of {} on http://{address}/{}",
        ctx.url,
        if options.read_only {
            " (read-only)"
        } else {
            ""
        }
    );
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        // Stops taking connections and ends the live streams, which would
        // otherwise keep it open.
        let _ = stop.send(true);
    });
    let router = web::router(
        Arc::new(ctx.manager),
        WebOptions {
            access,
            metrics: Some(prometheus),
            shutdown: Some(stopping.clone()),
            ..WebOptions::default()
        },
    );
    web::serve(listener, router, options.limits, stopping).await;
    Ok(String::new())
}
