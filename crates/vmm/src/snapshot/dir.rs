//! A snapshot directory: `config.json` (the VM configuration, readable
//! and editable), `state` (see [`super::format`]) and `memory0`,
//! `memory1`, ... (one per RAM region, see [`super::memory`]).
//!
//! `state` is written last, through a temporary name renamed into place,
//! so a directory with a `state` file holds a whole snapshot.

use std::path::{Path, PathBuf};

use vm_memory::GuestMemoryMmap;

use super::format::{decode_state, encode_state, FormatError, SnapshotState};
use super::memory::{save_memory, MemoryError};

pub const CONFIG_FILE: &str = "config.json";
pub const STATE_FILE: &str = "state";

/// Errors from writing or reading a snapshot directory.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state {path}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("guest memory")]
    Memory(#[source] MemoryError),
}

impl DirError {
    /// Whether the snapshot the user named is at fault (missing or bad
    /// files) rather than the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            DirError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::InvalidData
            ),
            DirError::Format { .. } => true,
            DirError::Memory(m) => !matches!(m, MemoryError::Map { .. }),
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DirError + 'a {
    move |source| DirError::Io {
        op,
        path: path.into(),
        source,
    }
}

/// What writing a snapshot did.
#[derive(Clone, Copy, Debug)]
pub struct WriteReport {
    /// Bytes of guest memory written (the rest are holes).
    pub memory_bytes: u64,
    pub state_bytes: u64,
}

/// Writes a whole snapshot into `dir` (created if missing). `state`'s
/// memory list is filled in here.
pub fn write_dir(
    dir: &Path,
    config_json: &[u8],
    mut state: SnapshotState,
    mem: &GuestMemoryMmap,
) -> Result<WriteReport, DirError> {
    std::fs::create_dir_all(dir).map_err(io("creating the snapshot directory", dir))?;
    let config = dir.join(CONFIG_FILE);
    std::fs::write(&config, config_json).map_err(io("writing", &config))?;
    let (regions, memory_bytes) = save_memory(mem, dir).map_err(DirError::Memory)?;
    state.memory = regions;
    let path = dir.join(STATE_FILE);
    let bytes = encode_state(&state).map_err(|source| DirError::Format {
        path: path.clone(),
        source,
    })?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(&bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io("renaming into place", &path))?;
    Ok(WriteReport {
        memory_bytes,
        state_bytes: bytes.len() as u64,
    })
}

/// Reads and checks `dir/state`.
pub fn read_state(dir: &Path) -> Result<SnapshotState, DirError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io("reading", &path))?;
    decode_state(&bytes).map_err(|source| DirError::Format { path, source })
}

/// Reads `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<Vec<u8>, DirError> {
    let path = dir.join(CONFIG_FILE);
    std::fs::read(&path).map_err(io("reading", &path))
}
