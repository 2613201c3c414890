// The front-end's call for torch tensors: one Python call that allocates a plan's outputs as at::empty does, calls
// one library entry point through its tvm-ffi C symbol on torch's current stream, and returns the outputs.
//
// A plan is made once per call signature by op/torch_call.py, after the Python front-end has validated the
// signature; what it fixes (outputs, the order of the entry point's arguments, the routing scalars) is parsed
// here once, so a call reads its tensors, allocates and calls. The outputs are torch's own tensors (made as
// at::empty makes them, so inside a graph capture they come from the graph's pool, and record_stream, resize_ and
// the caching allocator's bookkeeping work on them as on any other). The kernel library still allocates nothing and
// checks every argument at its boundary.
#include <Python.h>
#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <dlpack/dlpack.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <tvm/ffi/c_api.h>
#include <tvm/ffi/extra/c_env_api.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr const char* kCapsule = "fusedgate.torch_call.Plan";
// Bounds of what a plan may hold, so a call keeps its tensors and arguments on the stack.
constexpr int kMaxInputs = 4;
constexpr int kMaxOutputs = 4;
constexpr int kMaxSlots = 16;

enum class Source : uint8_t { kInput, kOutput, kInt, kBool, kFloat, kNone };

struct Slot {
  Source source;
  int index;  // input or output number
  int64_t integer;
  double real;
};

struct Output {
  std::vector<int64_t> shape;
  at::ScalarType dtype;
};

struct Plan {
  TVMFFISafeCallType function;
  at::Device device{at::kCPU};
  const DLPackExchangeAPI* exchange;  // torch's, for its current stream
  std::vector<std::string> input_names;
  std::vector<bool> optional;
  std::vector<Output> outputs;
  std::vector<Slot> slots;
  std::vector<std::pair<Source, int>> returns;
  bool release_gil;
};

bool dl_dtype(at::ScalarType type, DLDataType* out) {
  switch (type) {
    case at::kFloat:
      *out = {kDLFloat, 32, 1};
      return true;
    case at::kBFloat16:
      *out = {kDLBfloat, 16, 1};
      return true;
    case at::kHalf:
      *out = {kDLFloat, 16, 1};
      return true;
    case at::kDouble:
      *out = {kDLFloat, 64, 1};
      return true;
    case at::kInt:
      *out = {kDLInt, 32, 1};
      return true;
    case at::kLong:
      *out = {kDLInt, 64, 1};
      return true;
    case at::kShort:
      *out = {kDLInt, 16, 1};
      return true;
    case at::kChar:
      *out = {kDLInt, 8, 1};
      return true;
    case at::kByte:
      *out = {kDLUInt, 8, 1};
      return true;
    case at::kBool:
      *out = {kDLBool, 8, 1};
      return true;
    default:
      return false;
  }
}

// The DLTensor the library reads for `t`: torch keeps its sizes and strides alive while `t` is.
bool describe(const at::Tensor& t, const char* name, DLTensor* out) {
  const at::Device device = t.device();
  if (!device.is_cpu() && !device.is_cuda()) {
    PyErr_Format(PyExc_ValueError, "%s must be a CPU or CUDA tensor, got one on %s", name, device.str().c_str());
    return false;
  }
  if (!dl_dtype(t.scalar_type(), &out->dtype)) {
    PyErr_Format(PyExc_ValueError, "%s dtype %s is not supported: allowed float32, bfloat16, float16", name,
                 c10::toString(t.scalar_type()));
    return false;
  }
  out->data = t.data_ptr();
  out->device = DLDevice{device.is_cuda() ? kDLCUDA : kDLCPU, device.is_cuda() ? device.index() : 0};
  out->ndim = static_cast<int32_t>(t.dim());
  out->shape = const_cast<int64_t*>(t.sizes().data());
  out->strides = const_cast<int64_t*>(t.strides().data());
  out->byte_offset = 0;
  return true;
}

// The error the library raised, as the Python exception of its kind (ValueError, TypeError, ...; RuntimeError
// for kinds Python has no builtin of).
void raise_library_error() {
  TVMFFIObjectHandle error = nullptr;
  TVMFFIErrorMoveFromRaised(&error);
  if (error == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the library call failed without an error");
    return;
  }
  const auto* cell = reinterpret_cast<const TVMFFIErrorCell*>(static_cast<char*>(error) + sizeof(TVMFFIObject));
  const std::string kind(cell->kind.data, cell->kind.size);
  const std::string message(cell->message.data, cell->message.size);
  TVMFFIObjectDecRef(error);
  PyObject* type = PyExc_RuntimeError;
  PyObject* builtins = PyEval_GetBuiltins();
  PyObject* named = builtins == nullptr ? nullptr : PyDict_GetItemString(builtins, kind.c_str());
  if (named != nullptr && PyType_Check(named) && PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(named),
                                                                   reinterpret_cast<PyTypeObject*>(PyExc_Exception)))
    type = named;
  PyErr_SetString(type, message.c_str());
}

void destroy(PyObject* capsule) { delete static_cast<Plan*>(PyCapsule_GetPointer(capsule, kCapsule)); }

bool parse_dtype(PyObject* name, at::ScalarType* out) {
  const char* text = PyUnicode_AsUTF8(name);
  if (text == nullptr) return false;
  if (std::strcmp(text, "float32") == 0) {
    *out = at::kFloat;
  } else if (std::strcmp(text, "int32") == 0) {
    *out = at::kInt;
  } else if (std::strcmp(text, "int64") == 0) {
    *out = at::kLong;
  } else {
    PyErr_Format(PyExc_ValueError, "output dtype %s is not one the library writes: allowed float32, int32, int64",
                 text);
    return false;
  }
  return true;
}

// make(function_address, device_type, device_index, exchange_api, input_names, optional, outputs, slots, returns,
//      release_gil) -> plan
//   outputs: ((shape, dtype name), ...); slots: (("input"|"output", n) | ("int"|"bool"|"float", value) |
//   ("none", None), ...) in the entry point's argument order; returns: (("input"|"output", n) | ("none", None), ...)
PyObject* make(PyObject*, PyObject* args) {
  unsigned long long address = 0;
  const char* device_type = nullptr;
  int device_index = 0;
  PyObject *exchange, *names, *optional, *outputs, *slots, *returns;
  int release_gil = 0;
  if (!PyArg_ParseTuple(args, "KsiOO!O!O!O!O!p", &address, &device_type, &device_index, &exchange, &PyTuple_Type,
                        &names, &PyTuple_Type, &optional, &PyTuple_Type, &outputs, &PyTuple_Type, &slots,
                        &PyTuple_Type, &returns, &release_gil))
    return nullptr;
  auto plan = std::make_unique<Plan>();
  plan->function = reinterpret_cast<TVMFFISafeCallType>(static_cast<uintptr_t>(address));
  plan->release_gil = release_gil != 0;
  if (std::strcmp(device_type, "cuda") == 0) {
    plan->device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
  } else if (std::strcmp(device_type, "cpu") != 0) {
    PyErr_Format(PyExc_ValueError, "device_type %s is invalid: allowed cpu, cuda", device_type);
    return nullptr;
  }
  plan->exchange = static_cast<const DLPackExchangeAPI*>(PyCapsule_GetPointer(exchange, "dlpack_exchange_api"));
  if (plan->exchange == nullptr) return nullptr;
  if (PyTuple_GET_SIZE(names) > kMaxInputs || PyTuple_GET_SIZE(names) != PyTuple_GET_SIZE(optional) ||
      PyTuple_GET_SIZE(outputs) > kMaxOutputs || PyTuple_GET_SIZE(slots) > kMaxSlots) {
    PyErr_Format(PyExc_ValueError, "a plan holds at most %d inputs (each with its optional flag), %d outputs and %d "
                 "arguments", kMaxInputs, kMaxOutputs, kMaxSlots);
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); ++i) {
    const char* name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(names, i));
    if (name == nullptr) return nullptr;
    plan->input_names.emplace_back(name);
    plan->optional.push_back(PyObject_IsTrue(PyTuple_GET_ITEM(optional, i)) == 1);
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(outputs); ++i) {
    PyObject *shape, *dtype;
    if (!PyArg_ParseTuple(PyTuple_GET_ITEM(outputs, i), "O!O", &PyTuple_Type, &shape, &dtype)) return nullptr;
    Output out;
    for (Py_ssize_t d = 0; d < PyTuple_GET_SIZE(shape); ++d) {
      out.shape.push_back(PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d)));
      if (PyErr_Occurred()) return nullptr;
    }
    if (!parse_dtype(dtype, &out.dtype)) return nullptr;
    plan->outputs.push_back(std::move(out));
  }
  auto parse_reference = [&](PyObject* item, bool values_allowed, Slot* slot) -> bool {
    const char* kind = nullptr;
    PyObject* value = nullptr;
    if (!PyArg_ParseTuple(item, "sO", &kind, &value)) return false;
    const std::string k(kind);
    if (k == "none") {
      slot->source = Source::kNone;
      return true;
    }
    if (k == "input" || k == "output") {
      slot->source = k == "input" ? Source::kInput : Source::kOutput;
      slot->index = static_cast<int>(PyLong_AsLong(value));
      const size_t limit = k == "input" ? plan->input_names.size() : plan->outputs.size();
      if (slot->index < 0 || static_cast<size_t>(slot->index) >= limit) {
        if (!PyErr_Occurred())
          PyErr_Format(PyExc_ValueError, "%s %d is out of range: the plan has %zu", kind, slot->index, limit);
        return false;
      }
      return true;
    }
    if (values_allowed && (k == "int" || k == "bool")) {
      slot->source = k == "int" ? Source::kInt : Source::kBool;
      slot->integer = k == "int" ? PyLong_AsLongLong(value) : PyObject_IsTrue(value);
      return !PyErr_Occurred();
    }
    if (values_allowed && k == "float") {
      slot->source = Source::kFloat;
      slot->real = PyFloat_AsDouble(value);
      return !PyErr_Occurred();
    }
    PyErr_Format(PyExc_ValueError, "argument kind %s is invalid: allowed input, output, %snone", kind,
                 values_allowed ? "int, bool, float, " : "");
    return false;
  };
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(slots); ++i) {
    Slot slot{};
    if (!parse_reference(PyTuple_GET_ITEM(slots, i), true, &slot)) return nullptr;
    plan->slots.push_back(slot);
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(returns); ++i) {
    Slot slot{};
    if (!parse_reference(PyTuple_GET_ITEM(returns, i), false, &slot)) return nullptr;
    plan->returns.emplace_back(slot.source, slot.index);
  }
  PyObject* capsule = PyCapsule_New(plan.get(), kCapsule, destroy);
  if (capsule != nullptr) plan.release();
  return capsule;
}

// The library's stream for the call: torch's current stream of the plan's device, restored afterwards.
class CallStream {
 public:
  explicit CallStream(const Plan& plan) : device_(plan.device) {
    if (!device_.is_cuda()) return;
    void* stream = nullptr;
    if (plan.exchange->current_work_stream(kDLCUDA, device_.index(), &stream) != 0) return;
    active_ = TVMFFIEnvSetStream(kDLCUDA, device_.index(), stream, &saved_) == 0;
    if (!active_) PyErr_SetString(PyExc_RuntimeError, "could not set the library's stream");
  }
  bool ok() const { return !device_.is_cuda() || active_; }
  ~CallStream() {
    if (active_) TVMFFIEnvSetStream(kDLCUDA, device_.index(), saved_, nullptr);
  }

 private:
  at::Device device_;
  bool active_ = false;
  TVMFFIStreamHandle saved_ = nullptr;
};

// call(plan, *inputs) -> tuple of the plan's returns
PyObject* call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs < 1) {
    PyErr_SetString(PyExc_TypeError, "call takes a plan and its inputs");
    return nullptr;
  }
  const auto* plan = static_cast<const Plan*>(PyCapsule_GetPointer(args[0], kCapsule));
  if (plan == nullptr) return nullptr;
  const Py_ssize_t inputs = static_cast<Py_ssize_t>(plan->input_names.size());
  if (nargs - 1 != inputs) {
    PyErr_Format(PyExc_TypeError, "the plan takes %zd inputs, got %zd", inputs, nargs - 1);
    return nullptr;
  }
  std::array<DLTensor, kMaxInputs> in{};
  std::array<bool, kMaxInputs> given{};
  for (Py_ssize_t i = 0; i < inputs; ++i) {
    PyObject* object = args[1 + i];
    const char* name = plan->input_names[i].c_str();
    if (object == Py_None && plan->optional[i]) continue;
    if (!THPVariable_Check(object)) {
      PyErr_Format(PyExc_ValueError, "%s must be a torch tensor, got %s", name, Py_TYPE(object)->tp_name);
      return nullptr;
    }
    if (!describe(THPVariable_Unpack(object), name, &in[i])) return nullptr;
    given[i] = true;
  }
  // The outputs are made as at::empty makes them, from the allocator torch registers for the device (on CUDA its
  // caching allocator, which serves the current device and stream, a capture's pool included), without
  // at::empty's operator dispatch and option parsing per tensor: a sixth to a third of a microsecond each. Where
  // torch is asked to fill fresh memory (deterministic algorithms), at::empty itself makes them, so rows a call
  // leaves untouched (past num_tokens) hold that fill as they would from torch.empty. The device stays current
  // through the library call.
  const c10::DeviceGuard device_guard(plan->device);
  const at::Context& context = at::globalContext();
  const bool filled = context.deterministicAlgorithms() && context.deterministicFillUninitializedMemory();
  c10::Allocator* allocator = c10::GetAllocator(plan->device.type());
  const c10::DispatchKeySet keys(plan->device.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
  const size_t count = plan->outputs.size();
  std::array<at::Tensor, kMaxOutputs> out;
  std::array<DLTensor, kMaxOutputs> out_dl{};
  for (size_t i = 0; i < count; ++i) {
    const Output& spec = plan->outputs[i];
    out[i] = filled ? at::empty(spec.shape, at::TensorOptions().dtype(spec.dtype).device(plan->device))
                    : at::detail::empty_generic(spec.shape, allocator, keys, spec.dtype, std::nullopt);
    if (!describe(out[i], "output", &out_dl[i])) return nullptr;
  }
  std::array<TVMFFIAny, kMaxSlots> packed{};
  for (size_t i = 0; i < plan->slots.size(); ++i) {
    const Slot& slot = plan->slots[i];
    TVMFFIAny& arg = packed[i];
    switch (slot.source) {
      case Source::kInput:
        if (given[slot.index]) {
          arg.type_index = kTVMFFIDLTensorPtr;
          arg.v_ptr = &in[slot.index];
        } else {
          arg.type_index = kTVMFFINone;
        }
        break;
      case Source::kOutput:
        arg.type_index = kTVMFFIDLTensorPtr;
        arg.v_ptr = &out_dl[slot.index];
        break;
      case Source::kInt:
        arg.type_index = kTVMFFIInt;
        arg.v_int64 = slot.integer;
        break;
      case Source::kBool:
        arg.type_index = kTVMFFIBool;
        arg.v_int64 = slot.integer;
        break;
      case Source::kFloat:
        arg.type_index = kTVMFFIFloat;
        arg.v_float64 = slot.real;
        break;
      case Source::kNone:
        arg.type_index = kTVMFFINone;
        break;
    }
  }
  TVMFFIAny result{};
  result.type_index = kTVMFFINone;
  int status = 0;
  {
    CallStream stream(*plan);
    if (!stream.ok()) return nullptr;
    if (plan->release_gil) {
      Py_BEGIN_ALLOW_THREADS
      status = plan->function(nullptr, packed.data(), static_cast<int32_t>(plan->slots.size()), &result);
      Py_END_ALLOW_THREADS
    } else {
      status = plan->function(nullptr, packed.data(), static_cast<int32_t>(plan->slots.size()), &result);
    }
  }
  if (status != 0) {
    raise_library_error();
    return nullptr;
  }
  if (result.type_index >= kTVMFFIStaticObjectBegin) TVMFFIObjectDecRef(result.v_obj);
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(plan->returns.size()));
  if (tuple == nullptr) return nullptr;
  for (size_t i = 0; i < plan->returns.size(); ++i) {
    const auto& [source, index] = plan->returns[i];
    PyObject* item = source == Source::kOutput  ? THPVariable_Wrap(std::move(out[index]))
                     : source == Source::kInput ? Py_NewRef(args[1 + index])
                                                : Py_NewRef(Py_None);
    if (item == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), item);
  }
  return tuple;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"make", make, METH_VARARGS, "make(...) -> plan: see torch_call.cc"},
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(call)), METH_FASTCALL,
     "call(plan, *inputs) -> the plan's outputs"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "fusedgate_torch_call", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_fusedgate_torch_call() { return PyModule_Create(&module); }
