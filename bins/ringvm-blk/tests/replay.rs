//! Fixed inputs through the path the `vhost_user_messages` fuzz target
//! exercises (`ringvm_blk::replay`): malformed ones must end the
//! connection, not the daemon, and a well-formed session must reach the
//! disk. Needs io_uring, not /dev/kvm.

use ringvm_blk::replay::{sample_session, Replayer, SAMPLE_PATTERN};

fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut h = vec![0u8];
    h.extend_from_slice(&request.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

#[test]
fn well_formed_session_writes_the_disk() {
    let mut r = Replayer::new().unwrap();
    r.feed(&sample_session()).unwrap();
    let disk = std::fs::read(r.disk_path()).unwrap();
    assert!(disk[512..1024].iter().all(|&b| b == SAMPLE_PATTERN));
    assert!(disk[..512].iter().all(|&b| b == 0));
}

#[test]
fn malformed_messages_end_only_their_connection() {
    let mut r = Replayer::new().unwrap();
    let session = sample_session();
    let mut inputs: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0],
        vec![0, 0, 0, 1, 2, 3],
        // An unknown request, a huge size, a bad version.
        [vec![0, 0], header(0xffff, 1, 0)].concat(),
        [vec![0, 0], header(1, 1, u32::MAX)].concat(),
        [vec![0, 0], header(1, 7, 0)].concat(),
        // SET_MEM_TABLE claiming 8 regions, with no fds.
        [vec![0, 0], header(5, 1, 8), vec![8, 0, 0, 0, 0, 0, 0, 0]].concat(),
    ];
    // The sample session cut short everywhere in its message part.
    let start = 2 + 0x6001;
    for cut in (start..session.len()).step_by(7) {
        inputs.push(session[..cut].to_vec());
    }
    // Its memory table with a region past the end of the memfd.
    let mut past_eof = session.clone();
    let at = past_eof
        .windows(8)
        .position(|w| w == ringvm_blk::replay::SHARED_MEMORY.to_le_bytes())
        .unwrap();
    past_eof[at..at + 8].copy_from_slice(&(1u64 << 30).to_le_bytes());
    inputs.push(past_eof);
    // Cut-short inputs may wait for a request that never completes.
    r.set_wait(std::time::Duration::from_millis(50));
    for input in &inputs {
        r.feed(input).unwrap();
    }
    r.set_wait(std::time::Duration::from_secs(1));
    // The daemon still serves a good front-end afterwards.
    r.feed(&session).unwrap();
    let disk = std::fs::read(r.disk_path()).unwrap();
    assert!(disk[512..1024].iter().all(|&b| b == SAMPLE_PATTERN));
}

/// Writes `sample_session()` as the fuzz target's seed:
/// `cargo test -p ringvm-blk --test replay -- --ignored write_fuzz_seed`.
#[test]
#[ignore]
fn write_fuzz_seed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus/vhost_user_messages");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sample_session"), sample_session()).unwrap();
}
