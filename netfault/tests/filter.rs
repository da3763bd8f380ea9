//! The packet filter against real sockets of a real child process (needs
//! root and iptables, as `make test` has them).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use netfault::{Fault, PacketFilter};

const GID: u32 = 4391;

/// Invariant (a cut is a partition of one process, both ways, and heals
/// without losing bytes): a child running with the tracked group id gets
/// nothing through while blackholed, then what it sent arrives once
/// healed; a connection of another process to the same port is untouched
/// throughout.
#[test]
fn a_cut_partitions_one_process_from_a_port_and_heals() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let filter = PacketFilter::install("NETFAULT_TEST", port).unwrap();
    filter.track(GID).unwrap();

    // The child copies its stdin, line by line, to a connection it opens.
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; while read -r line; do echo \"$line\" >&3 || exit 7; done"
        ))
        .gid(GID)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_child = child.stdin.take().unwrap();
    let (from_child, _) = listener.accept().unwrap();
    from_child
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut lines = BufReader::new(from_child.try_clone().unwrap());
    let mut line = String::new();
    writeln!(to_child, "one").unwrap();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "one\n");

    // Another process (this one) on the same port.
    let mut bystander = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut bystander_peer, _) = listener.accept().unwrap();
    bystander_peer
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();

    filter.set(GID, Fault::Blackhole).unwrap();
    writeln!(to_child, "two").unwrap();
    line.clear();
    let cut = lines.read_line(&mut line);
    println!("blackholed: read → {cut:?} {line:?}");
    assert!(
        cut.as_ref()
            .is_err_and(|e| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "nothing arrives through the cut: {cut:?} {line:?}"
    );
    bystander.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    bystander_peer.read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"x", "another process passes");

    filter.set(GID, Fault::Pass).unwrap();
    from_child
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    lines.read_line(&mut line).unwrap();
    println!("healed: {line:?}");
    assert_eq!(line, "two\n", "held bytes arrive once healed");

    assert!(
        filter.set(GID, Fault::Reset).is_err(),
        "resets are the proxy's, refused here"
    );
    drop(to_child);
    let _ = child.wait();
}
