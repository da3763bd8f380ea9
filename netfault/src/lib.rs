#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod filter;
pub use filter::PacketFilter;

/// What the proxy does to one direction of every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward at once.
    #[default]
    Pass,
    /// Forward each chunk after this long.
    Delay(Duration),
    /// Forward nothing; keep the sockets open; deliver what was held once
    /// the direction passes again.
    Blackhole,
    /// Reset every connection (open and new).
    Reset,
}

/// The faults of both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Client → server.
    pub upstream: Fault,
    /// Server → client.
    pub downstream: Fault,
}

impl Faults {
    fn resets(&self) -> bool {
        self.upstream == Fault::Reset || self.downstream == Fault::Reset
    }
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    faults: Arc<watch::Sender<Faults>>,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (faults, _) = watch::channel(Faults::default());
        let faults = Arc::new(faults);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            faults.clone(),
            accepted.clone(),
        ));
        Ok(Self {
            addr,
            faults,
            accepted,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the fault of each direction, for open and new connections.
    pub fn set(&self, upstream: Fault, downstream: Fault) {
        self.faults.send_replace(Faults {
            upstream,
            downstream,
        });
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        *self.faults.borrow()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: Arc<watch::Sender<Faults>>,
    accepted: Arc<AtomicU64>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let faults = faults.subscribe();
        connections.spawn(async move {
            if faults.borrow().resets() {
                reset(client);
                return;
            }
            match TcpStream::connect(upstream).await {
                Ok(server) => relay(client, server, faults).await,
                Err(err) => {
                    tracing::debug!(%upstream, error = %err, "netfault: upstream refused");
                    reset(client);
                }
            }
        });
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
}

fn reset(stream: TcpStream) {
    // Linger 0: closing sends RST instead of FIN.
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn relay(client: TcpStream, server: TcpStream, faults: watch::Receiver<Faults>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, faults.clone(), |f| f.upstream);
    let down = pump(server_read, client_write, faults, |f| f.downstream);
    // Either direction ending (EOF, error, reset) ends the connection.
    let ended = tokio::select! {
        ended = up => ended,
        ended = down => ended,
    };
    if let Some((a, b)) = ended {
        let _ = a.as_ref().set_zero_linger();
        drop((a, b));
    }
}

/// Forwards one direction under its fault. Returns the halves to reset when
/// the fault says so, `None` when the connection ended by itself.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut faults: watch::Receiver<Faults>,
    pick: fn(&Faults) -> Fault,
) -> Option<(OwnedReadHalf, OwnedWriteHalf)> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Wait while blackholed: nothing read, so nothing is forwarded and
        // the bytes wait in the socket.
        loop {
            let current = *faults.borrow_and_update();
            if current.resets() {
                return Some((from, to));
            }
            if pick(&current) != Fault::Blackhole {
                break;
            }
            if faults.changed().await.is_err() {
                return None;
            }
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            },
            changed = faults.changed() => {
                if changed.is_err() {
                    return None;
                }
                continue;
            }
        };
        // A fault switched on while the chunk was read applies to it.
        loop {
            let current = *faults.borrow_and_update();
            if current.resets() {
                return Some((from, to));
            }
            match pick(&current) {
                Fault::Blackhole => {
                    if faults.changed().await.is_err() {
                        return None;
                    }
                }
                Fault::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Fault::Pass | Fault::Reset => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server on loopback.
    async fn echo() -> io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(addr)
    }

    async fn round_trip(stream: &mut TcpStream, within: Duration) -> io::Result<Option<Vec<u8>>> {
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(within, stream.read_exact(&mut buf)).await {
            Ok(read) => read.map(|_| Some(buf.to_vec())),
            Err(_) => Ok(None),
        }
    }

    #[tokio::test]
    async fn passes_blackholes_then_delivers_what_it_held() -> io::Result<()> {
        let proxy = FaultProxy::start(echo().await?).await?;
        let mut stream = TcpStream::connect(proxy.addr()).await?;
        let short = Duration::from_millis(300);
        assert_eq!(
            round_trip(&mut stream, short).await?,
            Some(b"ping".to_vec())
        );

        proxy.set(Fault::Blackhole, Fault::Pass);
        assert_eq!(
            round_trip(&mut stream, short).await?,
            None,
            "cut off upstream"
        );
        proxy.set(Fault::Pass, Fault::Blackhole);
        // The held ping reaches the server now; its echo is held downstream.
        let mut buf = [0u8; 4];
        let held = tokio::time::timeout(short, stream.read_exact(&mut buf)).await;
        assert!(held.is_err(), "cut off downstream");
        proxy.set(Fault::Pass, Fault::Pass);
        tokio::time::timeout(short, stream.read_exact(&mut buf)).await??;
        assert_eq!(&buf, b"ping", "held bytes delivered after healing");
        assert_eq!(
            round_trip(&mut stream, short).await?,
            Some(b"ping".to_vec())
        );
        Ok(())
    }

    #[tokio::test]
    async fn delays_each_chunk() -> io::Result<()> {
        let proxy = FaultProxy::start(echo().await?).await?;
        let mut stream = TcpStream::connect(proxy.addr()).await?;
        proxy.set(Fault::Delay(Duration::from_millis(150)), Fault::Pass);
        let started = std::time::Instant::now();
        let echoed = round_trip(&mut stream, Duration::from_secs(2)).await?;
        assert_eq!(echoed, Some(b"ping".to_vec()));
        assert!(started.elapsed() >= Duration::from_millis(150));
        Ok(())
    }

    #[tokio::test]
    async fn resets_open_and_new_connections() -> io::Result<()> {
        let proxy = FaultProxy::start(echo().await?).await?;
        let mut open = TcpStream::connect(proxy.addr()).await?;
        assert!(round_trip(&mut open, Duration::from_millis(300))
            .await?
            .is_some());
        proxy.set(Fault::Reset, Fault::Pass);
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(2), open.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "open connection ended: {read:?}"
        );
        let mut new = TcpStream::connect(proxy.addr()).await?;
        let read = tokio::time::timeout(Duration::from_secs(2), new.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "new connection reset: {read:?}"
        );
        assert_eq!(proxy.accepted(), 2);
        Ok(())
    }
}
