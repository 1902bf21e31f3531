//! `hostvisor disk`: create, inspect, convert, resize, check, rebase and
//! commit disk images (the block crate's tools, with a terminal face).

use std::path::{Path, PathBuf};

use block::tools::{self, CreateSpec, ImageInfo, NewSize, ToolError};
use block::Format;
use clap::Subcommand;

use crate::progress::{progress_bar, spinner};
use crate::CliError;

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Create an empty image (qcow2 by default), optionally an overlay of
    /// a backing file (a linked clone).
    Create {
        file: PathBuf,
        /// Virtual size, like 20G; defaults to the backing file's size.
        #[arg(long, value_parser = tools::parse_size)]
        size: Option<u64>,
        #[arg(long, default_value = "qcow2", value_parser = parse_format)]
        format: Format,
        /// Backing file, stored as given (relative names are relative to
        /// the new image's directory).
        #[arg(long, short = 'b', value_name = "BASE")]
        backing: Option<String>,
        /// The backing file's format; probed when not given.
        #[arg(long, short = 'F', value_parser = parse_format)]
        backing_format: Option<Format>,
        /// qcow2 cluster size (512 bytes to 2M; default 64K).
        #[arg(long, value_parser = tools::parse_size)]
        cluster_size: Option<u64>,
    },
    /// Show an image's format, sizes and its whole backing chain.
    Info {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        /// Read the file as this format instead of probing it.
        #[arg(long, value_parser = parse_format)]
        format: Option<Format>,
    },
    /// Copy an image's contents (through its chain) into a new, sparse
    /// image of the given format.
    Convert {
        src: PathBuf,
        dst: PathBuf,
        #[arg(long, short = 'O', value_parser = parse_format)]
        format: Format,
        #[arg(long, value_parser = parse_format)]
        src_format: Option<Format>,
    },
    /// Grow an image: a new size like 30G, or +5G.
    Resize {
        file: PathBuf,
        #[arg(allow_hyphen_values = true)]
        size: NewSize,
        #[arg(long, value_parser = parse_format)]
        format: Option<Format>,
    },
    /// Check a qcow2 image's metadata. Exit status as qemu-img: 0 clean,
    /// 2 corruption, 3 leaked clusters only.
    Check {
        file: PathBuf,
        /// Fix what can be fixed (leaks, refcounts, flags).
        #[arg(long, short = 'r')]
        repair: bool,
        #[arg(long)]
        json: bool,
        #[arg(long, value_parser = parse_format)]
        format: Option<Format>,
    },
    /// Point an overlay at another backing file ("" for none), copying the
    /// data that would otherwise change; --unsafe only rewrites the name.
    Rebase {
        file: PathBuf,
        #[arg(long, short = 'b', value_name = "BASE")]
        backing: String,
        #[arg(long, short = 'F', value_parser = parse_format)]
        backing_format: Option<Format>,
        #[arg(long = "unsafe", short = 'u')]
        unsafe_: bool,
    },
    /// Write an overlay's changes into its backing file and empty it.
    Commit { file: PathBuf },
    /// Time a run of requests through hostvisor's image engine, with the
    /// options and request sequence of `qemu-img bench` (queue depth 1).
    Bench {
        file: PathBuf,
        /// Number of requests.
        #[arg(short = 'c', long, default_value_t = 75000)]
        count: u64,
        /// Request size.
        #[arg(short = 's', long, default_value = "4K", value_parser = tools::parse_size)]
        size: u64,
        /// First offset.
        #[arg(short = 'o', long, default_value = "0", value_parser = tools::parse_size)]
        offset: u64,
        /// Distance between requests (default: the request size).
        #[arg(short = 'S', long, value_parser = tools::parse_size)]
        step: Option<u64>,
        /// Write instead of read.
        #[arg(short = 'w', long)]
        write: bool,
        /// Host cache mode: writeback, none or unsafe.
        #[arg(short = 't', long, default_value = "writeback")]
        cache: block::CacheMode,
        #[arg(short = 'f', long, value_parser = parse_format)]
        format: Option<Format>,
    },
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse().map_err(|e: block::FormatError| e.to_string())
}

fn failure(e: ToolError) -> CliError {
    CliError::Failure(vmm::error_chain(&e))
}

/// Runs a disk command; returns the process exit code.
pub fn run(cmd: DiskCommand) -> Result<i32, CliError> {
    match cmd {
        DiskCommand::Create {
            file,
            size,
            format,
            backing,
            backing_format,
            cluster_size,
        } => {
            let size = tools::create(&CreateSpec {
                path: file.clone(),
                size,
                format,
                backing: backing.clone(),
                backing_format,
                cluster_size,
            })
            .map_err(failure)?;
            let on = backing
                .map(|b| format!(", backed by {b}"))
                .unwrap_or_default();
            println!(
                "created {} ({format}, {}{on})",
                file.display(),
                tools::human_size(size)
            );
        }
        DiskCommand::Info { file, json, format } => {
            let info = tools::info(&file, format).map_err(failure)?;
            if json {
                let text = serde_json::to_string_pretty(&info)
                    .map_err(|e| CliError::Failure(e.to_string()))?;
                println!("{text}");
            } else {
                print_info(&info);
            }
        }
        DiskCommand::Convert {
            src,
            dst,
            format,
            src_format,
        } => {
            let (bar, mut progress) = progress_bar("converting");
            let result = tools::convert(&src, src_format, &dst, format, &mut progress);
            bar.finish_and_clear();
            result.map_err(failure)?;
        }
        DiskCommand::Resize { file, size, format } => {
            let bar = spinner("resizing");
            let result = tools::resize(&file, format, size);
            bar.finish_and_clear();
            let size = result.map_err(failure)?;
            println!("{} is now {}", file.display(), tools::human_size(size));
        }
        DiskCommand::Check {
            file,
            repair,
            json,
            format,
        } => {
            let bar = spinner(if repair {
                "checking and repairing"
            } else {
                "checking"
            });
            let result = tools::check(&file, format, repair);
            bar.finish_and_clear();
            let report = result.map_err(failure)?;
            if json {
                let text = serde_json::to_string_pretty(&report)
                    .map_err(|e| CliError::Failure(e.to_string()))?;
                println!("{text}");
            } else {
                print_check(&file, &report, repair);
            }
            return Ok(if report.corruptions > 0 {
                2
            } else if report.leaks > 0 {
                3
            } else {
                0
            });
        }
        DiskCommand::Rebase {
            file,
            backing,
            backing_format,
            unsafe_,
        } => {
            let new = (!backing.is_empty()).then_some(backing.as_str());
            let (bar, mut progress) = progress_bar("rebasing");
            let result = tools::rebase(&file, new, backing_format, unsafe_, &mut progress);
            bar.finish_and_clear();
            result.map_err(failure)?;
        }
        DiskCommand::Commit { file } => {
            let (bar, mut progress) = progress_bar("committing");
            let result = tools::commit(&file, &mut progress);
            bar.finish_and_clear();
            result.map_err(failure)?;
            println!("committed {} into its backing file", file.display());
        }
        DiskCommand::Bench {
            file,
            count,
            size,
            offset,
            step,
            write,
            cache,
            format,
        } => {
            let request = usize::try_from(size)
                .map_err(|_| CliError::Usage("the request size is too large".into()))?;
            let spec = tools::BenchSpec {
                count,
                size: request,
                offset,
                step: step.unwrap_or(size),
                write,
                cache,
                format,
            };
            println!(
                "Sending {count} {} requests, {size} bytes each, step {}, cache {cache}",
                if write { "write" } else { "read" },
                spec.step
            );
            let took = tools::bench(&file, spec).map_err(failure)?;
            println!("Run completed in {:.3} seconds.", took.as_secs_f64());
        }
    }
    Ok(0)
}

fn print_info(info: &ImageInfo) {
    let mut next = Some(info);
    let mut first = true;
    while let Some(i) = next {
        if !first {
            println!();
        }
        first = false;
        println!("image: {}", i.filename);
        println!("file format: {}", i.format);
        println!(
            "virtual size: {} ({} bytes)",
            tools::human_size(i.virtual_size),
            i.virtual_size
        );
        println!("disk size: {}", tools::human_size(i.actual_size));
        if let Some(cs) = i.cluster_size {
            println!("cluster_size: {cs}");
        }
        if let Some(name) = &i.backing_file {
            match &i.backing_format {
                Some(f) => println!("backing file: {name} (format {f})"),
                None => println!("backing file: {name}"),
            }
        }
        if let Some(why) = &i.backing_refused {
            println!("backing file not opened: {why}");
        }
        if !i.snapshots.is_empty() {
            println!("snapshots:");
            for s in &i.snapshots {
                println!(
                    "    {:<4} {:<20} vm state {}",
                    s.id,
                    s.name,
                    tools::human_size(s.vm_state_size)
                );
            }
        }
        if let Some(q) = &i.qcow2 {
            println!("format specific information:");
            println!(
                "    compat: {}",
                if q.version == 3 { "1.1" } else { "0.10" }
            );
            println!("    compression type: {}", q.compression_type);
            println!("    lazy refcounts: {}", q.lazy_refcounts);
            println!("    refcount bits: {}", q.refcount_bits);
            println!("    corrupt: {}", q.corrupt);
            if q.dirty {
                println!("    dirty: true (repaired when next opened for writing)");
            }
        }
        next = i.backing.as_deref();
    }
}

fn print_check(file: &Path, r: &block::qcow2::CheckReport, repair: bool) {
    for m in &r.messages {
        println!("{m}");
    }
    if repair && r.repaired > 0 {
        println!("repaired {} problems", r.repaired);
    }
    if r.corruptions == 0 && r.leaks == 0 {
        println!("No errors were found on the image {}.", file.display());
    } else {
        if r.leaks > 0 {
            println!(
                "{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                r.leaks
            );
        }
        if r.corruptions > 0 {
            println!(
                "{} errors were found on the image.\nData may be corrupted; run `hostvisor disk check --repair`.",
                r.corruptions
            );
        }
    }
    if r.total_clusters > 0 {
        println!(
            "{}/{} = {:.2}% allocated",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64
        );
    }
    println!("Image end offset: {}", r.image_end_offset);
}
