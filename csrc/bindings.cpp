// Python bindings of the core (module vllm_sleep_ext._core). Type conversion only; no logic here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "errors.h"
#include "process.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

PyObject* sleep_ext_error = nullptr;
PyObject* device_out_of_memory = nullptr;
PyObject* host_out_of_memory = nullptr;
PyObject* driver_unavailable = nullptr;

std::vector<vse::ByteRange> to_ranges(const std::vector<std::pair<uintptr_t, uint64_t>>& pairs) {
  std::vector<vse::ByteRange> out;
  out.reserve(pairs.size());
  for (const auto& [address, bytes] : pairs) out.push_back({address, address + bytes});
  return out;
}

uint64_t positive_size(int64_t size) {
  if (size <= 0) throw vse::InvalidArgument("allocation size must be positive, got " + std::to_string(size));
  return static_cast<uint64_t>(size);
}

PyObject* new_exception(py::module_& m, const char* name, PyObject* base, const char* doc) {
  std::string qualified = std::string("vllm_sleep_ext._core.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, base, nullptr);
  m.add_object(name, py::reinterpret_borrow<py::object>(type));
  return type;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "C++ core of vllm_sleep_ext: tagged VMM allocations that sleep and wake.";

  sleep_ext_error = new_exception(m, "SleepExtError", PyExc_RuntimeError, "A sleep-allocator operation failed.");
  device_out_of_memory = new_exception(m, "DeviceOutOfMemoryError", sleep_ext_error,
                                       "The device has no room; nothing was changed, retry once memory is free.");
  host_out_of_memory = new_exception(m, "HostOutOfMemoryError", sleep_ext_error,
                                     "Host memory for backups could not be had; nothing was released.");
  driver_unavailable = new_exception(m, "DriverUnavailableError", sleep_ext_error,
                                     "No usable CUDA driver or device.");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const vse::DeviceOutOfMemory& e) {
      PyErr_SetString(device_out_of_memory, e.what());
    } catch (const vse::HostOutOfMemory& e) {
      PyErr_SetString(host_out_of_memory, e.what());
    } catch (const vse::DriverUnavailable& e) {
      PyErr_SetString(driver_unavailable, e.what());
    } catch (const vse::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const vse::Error& e) {
      PyErr_SetString(sleep_ext_error, e.what());
    }
  });

  py::class_<vse::AllocationInfo>(m, "AllocationInfo")
      .def_readonly("ptr", &vse::AllocationInfo::address)
      .def_readonly("size", &vse::AllocationInfo::size)
      .def_readonly("device", &vse::AllocationInfo::device)
      .def_readonly("tag", &vse::AllocationInfo::tag)
      .def_property_readonly("state", [](const vse::AllocationInfo& a) { return vse::state_name(a.state); })
      .def_readonly("backup_bytes", &vse::AllocationInfo::backup_bytes)
      .def_readonly("preserved_bytes", &vse::AllocationInfo::preserved_bytes)
      .def_readonly("disk_bytes", &vse::AllocationInfo::disk_bytes)
      .def_readonly("stored_bytes", &vse::AllocationInfo::stored_bytes);

  py::class_<vse::TagStats>(m, "TagStats")
      .def_readonly("allocations", &vse::TagStats::allocations)
      .def_readonly("mapped_bytes", &vse::TagStats::mapped_bytes)
      .def_readonly("asleep_bytes", &vse::TagStats::asleep_bytes)
      .def_readonly("backed_up_bytes", &vse::TagStats::backed_up_bytes)
      .def_readonly("preserved_bytes", &vse::TagStats::preserved_bytes)
      .def_readonly("disk_bytes", &vse::TagStats::disk_bytes)
      .def_readonly("stored_bytes", &vse::TagStats::stored_bytes);

  py::class_<vse::OpStats>(m, "OpStats")
      .def_readonly("seconds", &vse::OpStats::seconds)
      .def_readonly("bytes_copied", &vse::OpStats::bytes_copied)
      .def_readonly("bytes_device", &vse::OpStats::bytes_device)
      .def_readonly("allocations", &vse::OpStats::allocations)
      .def_readonly("mappings", &vse::OpStats::mappings)
      .def_property_readonly("populate_seconds", [](const vse::OpStats& s) { return s.staging.populate_seconds; })
      .def_property_readonly("pin_seconds", [](const vse::OpStats& s) { return s.staging.pin_seconds; })
      .def_readonly("sync_seconds", &vse::OpStats::sync_seconds)
      .def_readonly("copy_wait_seconds", &vse::OpStats::copy_wait_seconds)
      .def_readonly("unmap_seconds", &vse::OpStats::unmap_seconds)
      .def_readonly("release_seconds", &vse::OpStats::release_seconds)
      .def_readonly("map_seconds", &vse::OpStats::map_seconds)
      .def_readonly("wait_seconds", &vse::OpStats::wait_seconds)
      .def_property_readonly("disk_bytes", [](const vse::OpStats& s) { return s.disk.bytes; })
      .def_property_readonly("disk_seconds", [](const vse::OpStats& s) { return s.disk.seconds; })
      .def_property_readonly("compress_plain_bytes", [](const vse::OpStats& s) { return s.compress.plain_bytes; })
      .def_property_readonly("compress_stored_bytes", [](const vse::OpStats& s) { return s.compress.stored_bytes; })
      .def_property_readonly("pieces_packed", [](const vse::OpStats& s) { return s.compress.pieces_packed; })
      .def_property_readonly("pieces_plain", [](const vse::OpStats& s) { return s.compress.pieces_plain; })
      .def_property_readonly("staging_device_bytes", [](const vse::OpStats& s) { return s.compress.staging_bytes; });

  py::class_<vse::PrimeStats>(m, "PrimeStats")
      .def_readonly("rounds", &vse::PrimeStats::rounds)
      .def_readonly("skipped", &vse::PrimeStats::skipped)
      .def_readonly("failures", &vse::PrimeStats::failures)
      .def_readonly("last_seconds", &vse::PrimeStats::last_seconds)
      .def_readonly("longest_seconds", &vse::PrimeStats::longest_seconds)
      .def_readonly("last_error", &vse::PrimeStats::last_error);

  // Options and read-only views release the GIL while they wait for the core's lock, which a long
  // sleep holds; each setter changes its option in one locked step (update_options).
  using Release = py::call_guard<py::gil_scoped_release>;
  auto getter = [](auto read) {
    return py::cpp_function(
        [read](const vse::Allocator& a) {
          vse::AllocatorOptions o = a.options();
          return std::decay_t<decltype(read(o))>(read(o));
        },
        Release());
  };
  auto setter = [](auto write) {
    return py::cpp_function(
        [write](vse::Allocator& a, std::decay_t<decltype(write(std::declval<vse::AllocatorOptions&>()))> v) {
          a.update_options([&](vse::AllocatorOptions& o) { write(o) = v; });
        },
        Release());
  };
  auto option = [&](auto field) { return std::make_pair(getter(field), setter(field)); };
  auto keep_host_backups = option([](auto& o) -> auto& { return o.keep_host_backups; });
  auto host_memory_limit = option([](auto& o) -> auto& { return o.host_memory_limit; });
  auto staging_threads = option([](auto& o) -> auto& { return o.staging.threads; });
  auto staging_piece_bytes = option([](auto& o) -> auto& { return o.staging.piece_bytes; });
  auto fill_unrestored = option([](auto& o) -> auto& { return o.fill_unrestored; });
  auto host_prepare_rate = option([](auto& o) -> auto& { return o.host_prepare_rate; });
  auto slab_bytes = option([](auto& o) -> auto& { return o.slab_bytes; });
  auto prime_after_release = option([](auto& o) -> auto& { return o.prime_after_release; });
  auto reclaimable_pinned_share = option([](auto& o) -> auto& { return o.reclaimable_pinned_share; });
  auto disk_dir = option([](auto& o) -> auto& { return o.disk.dir; });
  auto disk_threads = option([](auto& o) -> auto& { return o.disk.threads; });
  auto compress_piece_bytes = option([](auto& o) -> auto& { return o.compress.piece_bytes; });
  auto compress_chunk_pieces = option([](auto& o) -> auto& { return o.compress.chunk_pieces; });
  auto compress_slots = option([](auto& o) -> auto& { return o.compress.slots; });

  py::class_<vse::Allocator>(m, "Allocator")
      .def(py::init(&vse::make_allocator), "backend"_a = "host", "capacity_bytes"_a = 0, "card"_a = "")
      .def_property_readonly("backend", &vse::Allocator::backend_name)
      .def("malloc",
           [](vse::Allocator& a, int64_t size, int device, const std::string& tag, bool may_synchronize) {
             return a.allocate(positive_size(size), device, tag, [may_synchronize] { return may_synchronize; });
           },
           "size"_a, "device"_a = 0, "tag"_a = "default", "may_synchronize"_a = true, Release())
      .def("free", &vse::Allocator::free, "ptr"_a, Release())
      .def("settle", &vse::Allocator::settle, Release())
      .def("quarantined_bytes", &vse::Allocator::quarantined_bytes, Release())
      .def("_device_free_bytes", [](vse::Allocator& a, int device) { return a.device_memory(device).free; },
           "device"_a = 0, Release())
      .def("sleep",
           [](vse::Allocator& a, const std::vector<std::string>& offload_tags,
              const std::vector<std::pair<uintptr_t, uint64_t>>& preserve,
              const std::vector<std::pair<uintptr_t, uint64_t>>& exclude) {
             auto keep = to_ranges(preserve);
             auto drop = to_ranges(exclude);
             py::gil_scoped_release release;
             return a.sleep(offload_tags, keep, drop);
           },
           "offload_tags"_a, "preserve"_a = std::vector<std::pair<uintptr_t, uint64_t>>{},
           "exclude"_a = std::vector<std::pair<uintptr_t, uint64_t>>{})
      .def("wake", &vse::Allocator::wake, "tags"_a = py::none(), "wait_seconds"_a = 0.0, Release())
      .def("discard", &vse::Allocator::discard, "tags"_a, Release())
      .def("allocations", &vse::Allocator::allocations, Release())
      .def("tag_stats", &vse::Allocator::tag_stats, Release())
      .def_property_readonly("last_sleep", py::cpp_function(&vse::Allocator::last_sleep, Release()))
      .def_property_readonly("last_wake", py::cpp_function(&vse::Allocator::last_wake, Release()))
      .def_property_readonly("prime_stats", py::cpp_function(&vse::Allocator::prime_stats, Release()))
      .def("host_bytes", &vse::Allocator::host_bytes, Release())
      .def("release_host_cache", &vse::Allocator::release_host_cache, Release())
      .def_property("keep_host_backups", keep_host_backups.first,
                    py::cpp_function(
                        [](vse::Allocator& a, bool v) {
                          a.update_options([&](vse::AllocatorOptions& o) {
                            o.keep_host_backups = v;
                            if (v && o.host_policy == vse::HostPolicy::Release) o.host_policy = vse::HostPolicy::Pinned;
                          });
                        },
                        Release()))
      .def_property("host_policy",
                    py::cpp_function(
                        [](const vse::Allocator& a) {
                          return std::string(vse::host_policy_name(a.options().effective_host_policy()));
                        },
                        Release()),
                    py::cpp_function(
                        [](vse::Allocator& a, const std::string& name) {
                          const vse::HostPolicy policy = vse::parse_host_policy(name);
                          a.update_options([&](vse::AllocatorOptions& o) {
                            o.host_policy = policy;
                            o.keep_host_backups = policy != vse::HostPolicy::Release;
                          });
                        },
                        Release()))
      .def_property("host_prepare_rate", host_prepare_rate.first, host_prepare_rate.second)
      .def("prepare_host", &vse::Allocator::prepare_host, "bytes"_a, "device"_a = 0, "wait"_a = false,
           "hold_bytes"_a = 0, Release())
      .def("wait_host", &vse::Allocator::wait_host, Release())
      .def("host_error", &vse::Allocator::host_error, Release())
      .def("host_pinned_bytes", &vse::Allocator::host_pinned_bytes, Release())
      .def("_simulate_host_reclaim", &vse::Allocator::simulate_host_reclaim, Release())
      .def_property("host_memory_limit", host_memory_limit.first, host_memory_limit.second)
      .def_property("staging_threads", staging_threads.first, staging_threads.second)
      .def_property("staging_piece_bytes", staging_piece_bytes.first, staging_piece_bytes.second)
      .def_property("fill_unrestored", fill_unrestored.first, fill_unrestored.second)
      .def_property("slab_bytes", slab_bytes.first, slab_bytes.second)
      .def_property("prime_after_release", prime_after_release.first, prime_after_release.second)
      .def_property("reclaimable_pinned_share", reclaimable_pinned_share.first, reclaimable_pinned_share.second)
      .def_property("disk_dir", disk_dir.first, disk_dir.second)
      .def_property("disk_threads", disk_threads.first, disk_threads.second)
      .def("_inject_disk_write_failure",
           [](vse::Allocator& a, int64_t file_offset) { a.disk_tier().inject_write_failure(file_offset); },
           "file_offset"_a)
      .def("_inject_disk_short_read",
           [](vse::Allocator& a, int64_t file_offset) { a.disk_tier().inject_short_read(file_offset); },
           "file_offset"_a)
      .def_property("compress",
                    py::cpp_function(
                        [](const vse::Allocator& a) { return std::string(vse::compress_mode_name(a.options().compress.mode)); },
                        Release()),
                    py::cpp_function(
                        [](vse::Allocator& a, const std::string& name) {
                          const vse::CompressMode mode = vse::parse_compress_mode(name);
                          a.update_options([&](vse::AllocatorOptions& o) { o.compress.mode = mode; });
                        },
                        Release()))
      .def_property("compress_piece_bytes", compress_piece_bytes.first, compress_piece_bytes.second)
      .def_property("compress_chunk_pieces", compress_chunk_pieces.first, compress_chunk_pieces.second)
      .def_property("compress_slots", compress_slots.first, compress_slots.second)
      .def("compress_unavailable", &vse::Allocator::compress_unavailable, Release());

  m.def("cuda_allocator", &vse::process_cuda_allocator, py::return_value_policy::reference,
        "The process-wide CUDA allocator behind my_malloc/my_free.");
  m.def("set_thread_tag", &vse::set_thread_tag, "tag"_a, "Sets this thread's pool tag; returns the previous one.");
  m.def("thread_tag", &vse::thread_tag);
}
