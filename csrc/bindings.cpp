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
      .def_readonly("preserved_bytes", &vse::AllocationInfo::preserved_bytes);

  py::class_<vse::TagStats>(m, "TagStats")
      .def_readonly("allocations", &vse::TagStats::allocations)
      .def_readonly("mapped_bytes", &vse::TagStats::mapped_bytes)
      .def_readonly("asleep_bytes", &vse::TagStats::asleep_bytes)
      .def_readonly("backed_up_bytes", &vse::TagStats::backed_up_bytes)
      .def_readonly("preserved_bytes", &vse::TagStats::preserved_bytes);

  py::class_<vse::OpStats>(m, "OpStats")
      .def_readonly("seconds", &vse::OpStats::seconds)
      .def_readonly("bytes_copied", &vse::OpStats::bytes_copied)
      .def_readonly("bytes_device", &vse::OpStats::bytes_device)
      .def_readonly("allocations", &vse::OpStats::allocations)
      .def_property_readonly("populate_seconds", [](const vse::OpStats& s) { return s.staging.populate_seconds; })
      .def_property_readonly("pin_seconds", [](const vse::OpStats& s) { return s.staging.pin_seconds; });

  auto option = [](auto member) {
    return py::cpp_function([member](const vse::Allocator& a) { return a.options().*member; });
  };
  py::class_<vse::Allocator>(m, "Allocator")
      .def(py::init(&vse::make_allocator), "backend"_a = "host", "capacity_bytes"_a = 0)
      .def_property_readonly("backend", &vse::Allocator::backend_name)
      .def("malloc",
           [](vse::Allocator& a, int64_t size, int device, const std::string& tag) {
             return a.allocate(positive_size(size), device, tag);
           },
           "size"_a, "device"_a = 0, "tag"_a = "default", py::call_guard<py::gil_scoped_release>())
      .def("free", &vse::Allocator::free, "ptr"_a, py::call_guard<py::gil_scoped_release>())
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
      .def("wake", &vse::Allocator::wake, "tags"_a = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("discard", &vse::Allocator::discard, "tags"_a, py::call_guard<py::gil_scoped_release>())
      .def("trim", &vse::Allocator::trim, "ptr"_a, py::call_guard<py::gil_scoped_release>())
      .def("allocations", &vse::Allocator::allocations)
      .def("tag_stats", &vse::Allocator::tag_stats)
      .def_property_readonly("last_sleep", &vse::Allocator::last_sleep)
      .def_property_readonly("last_wake", &vse::Allocator::last_wake)
      .def("host_bytes", &vse::Allocator::host_bytes)
      .def("release_host_cache", &vse::Allocator::release_host_cache, py::call_guard<py::gil_scoped_release>())
      .def_property("keep_host_backups", option(&vse::AllocatorOptions::keep_host_backups),
                    [](vse::Allocator& a, bool v) {
                      auto o = a.options();
                      o.keep_host_backups = v;
                      if (v && o.host_policy == vse::HostPolicy::Release) o.host_policy = vse::HostPolicy::Pinned;
                      a.set_options(o);
                    })
      .def_property("host_policy",
                    [](const vse::Allocator& a) { return vse::host_policy_name(a.options().effective_host_policy()); },
                    [](vse::Allocator& a, const std::string& name) {
                      auto o = a.options();
                      o.host_policy = vse::parse_host_policy(name);
                      o.keep_host_backups = o.host_policy != vse::HostPolicy::Release;
                      a.set_options(o);
                    })
      .def_property("host_prepare_rate", option(&vse::AllocatorOptions::host_prepare_rate),
                    [](vse::Allocator& a, uint64_t v) {
                      auto o = a.options();
                      o.host_prepare_rate = v;
                      a.set_options(o);
                    })
      .def("prepare_host", &vse::Allocator::prepare_host, "bytes"_a, "device"_a = 0, "wait"_a = false,
           py::call_guard<py::gil_scoped_release>())
      .def("wait_host", &vse::Allocator::wait_host, py::call_guard<py::gil_scoped_release>())
      .def("host_error", &vse::Allocator::host_error)
      .def("host_pinned_bytes", &vse::Allocator::host_pinned_bytes)
      .def("_simulate_host_reclaim", &vse::Allocator::simulate_host_reclaim,
           py::call_guard<py::gil_scoped_release>())
      .def_property("host_memory_limit", option(&vse::AllocatorOptions::host_memory_limit),
                    [](vse::Allocator& a, uint64_t v) {
                      auto o = a.options();
                      o.host_memory_limit = v;
                      a.set_options(o);
                    })
      .def_property("staging_threads", [](const vse::Allocator& a) { return a.options().staging.threads; },
                    [](vse::Allocator& a, unsigned v) {
                      auto o = a.options();
                      o.staging.threads = v;
                      a.set_options(o);
                    })
      .def_property("staging_piece_bytes", [](const vse::Allocator& a) { return a.options().staging.piece_bytes; },
                    [](vse::Allocator& a, uint64_t v) {
                      auto o = a.options();
                      o.staging.piece_bytes = v;
                      a.set_options(o);
                    });

  m.def("cuda_allocator", &vse::process_cuda_allocator, py::return_value_policy::reference,
        "The process-wide CUDA allocator behind my_malloc/my_free.");
  m.def("set_thread_tag", &vse::set_thread_tag, "tag"_a, "Sets this thread's pool tag; returns the previous one.");
  m.def("thread_tag", &vse::thread_tag);
}
